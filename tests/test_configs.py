"""Config grammar: `file.py:key=value,flag`, typed values, locked overrides."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common


def test_parse_arg_types_and_flags():
  arg = common.parse_arg("res=128,runlocal,lr=0.5,name=x", res=256, runlocal=False, lr=1.0,
                         name="y")
  assert (arg.res, arg.runlocal, arg.lr, arg.name) == (128, True, 0.5, "x")
  assert common.parse_arg("", res=256).res == 256
  assert common.parse_arg(None, flag=True).flag is True
  assert common.parse_arg("flag=false", flag=True).flag is False


@pytest.mark.parametrize("arg,message", [
    ("reso=128", "unknown config arg 'reso'"),
    ("res=abc", "'res'.*not an integer"),
    ("res", "'res' needs a value"),
    ("res=1,res=2", "given twice"),
    ("runlocal=maybe", "not a boolean"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(common.ConfigArgError, match=message):
    common.parse_arg(arg, res=256, runlocal=False)


def test_parsed_arg_is_locked():
  arg = common.parse_arg("", res=256)
  with pytest.raises(AttributeError, match=r'"resolution" does not exist.*config is locked'):
    arg.resolution = 3


def _flag_values(argv):
  fv = flags.FlagValues()
  argv = ["prog"] + argv
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_file_with_arg_and_override():
  cfg = _flag_values(["--config=configs/vfm.py:official", "--config.vfm.size=448",
                      "--config.vfm.num_heads=2"])
  assert cfg.vfm.size == 448 and cfg.vfm.num_heads == 2
  assert tuple(cfg.vfm.levels) == (5, 11, 17, 23)
  assert _flag_values(["--config=configs/vfm.py"]).vfm.source == "default"


def test_misspelled_override_names_the_key():
  with pytest.raises(Exception, match="sise.*Did you mean .size"):
    _flag_values(["--config=configs/vfm.py", "--config.vfm.sise=448"])


def test_misspelled_config_arg_names_the_key():
  with pytest.raises(Exception, match="offical"):
    _flag_values(["--config=configs/vfm.py:offical"])
