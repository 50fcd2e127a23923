"""Weight converters: foreign layouts (PyTorch state dicts, HF folders, ONNX) -> Flax trees."""
