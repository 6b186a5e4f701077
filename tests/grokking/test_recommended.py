"""shardgrok.recommended: constructor keyword arguments that construct, a clear error for what
was not measured, and the demo's specs built from them."""
import pytest
import torch
from torch import nn

import shardgrok
from shardgrok import GrokAdamW, SuperGrok, recommended, recommended_meta_schedule
from shardgrok.demo.recipes import RECOMMENDED, parse_spec


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("grokadamw", GrokAdamW),
                                      ("supergrok", SuperGrok)])
def test_keywords_construct_the_optimizer(name, cls):
    kw = recommended(name)
    opt = cls(nn.Linear(3, 2).parameters(), **kw)
    for k, v in kw.items():
        assert opt.param_groups[0][k] == v
    assert recommended(name, task="modular-arithmetic") == kw
    kw["lr"] = 1.0
    assert recommended(name)["lr"] != 1.0   # a copy: the caller's edits stay theirs


def test_what_was_not_measured_is_refused():
    with pytest.raises(ValueError, match="task 'language-model' has not been measured; the "
                                         "tasks measured are 'modular-arithmetic'"):
        recommended("grokadamw", task="language-model")
    with pytest.raises(ValueError, match="no settings for optimizer 'sgd'; choose from 'adamw', "
                                         "'grokadamw', 'supergrok'"):
        recommended("sgd")
    with pytest.raises(ValueError, match="has not been measured"):
        recommended_meta_schedule("language-model")


def test_the_demo_runs_exactly_these():
    for name in ("adamw", "grokadamw", "supergrok"):
        assert parse_spec(RECOMMENDED[name]) == (name, recommended(name))
    name, kw = parse_spec(RECOMMENDED["supergrok+meta"])
    assert name == "supergrok+meta" and kw.pop("meta_every") == recommended_meta_schedule()["every"]
    assert kw == recommended("supergrok")
    assert "recommended" in shardgrok.__all__
