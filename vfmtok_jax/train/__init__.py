"""The training library every trainer shares (see `loop.run` and `task.Task`)."""
