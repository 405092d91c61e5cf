"""stackformer.hf: the Hugging Face transformers wrapper round-trips through save_pretrained /
from_pretrained on a local folder (safetensors), keeps every wiring and knob, and computes what
sf.Model computes (logits within 1e-5; loss with labels = forward_backward on the shifted batch)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import stackformer as sf  # noqa: E402
from stackformer.hf import StackformerConfig, StackformerForCausalLM  # noqa: E402

from conftest import WIRINGS_AND_MODA  # noqa: E402

BASE = dict(vocab_size=53, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)
CASES = ["plain", "attnres_block", "denseformer", "hyper_connections_dynamic", "mhc", "moda",
         "attnres_block+moda"]


def _model(name, **kw):
    m = sf.Model(sf.Config(**{**BASE, **WIRINGS_AND_MODA[name], **kw}), seed=3)
    rng = np.random.default_rng(4)
    sd = m.state_dict()  # move every tensor off its init so the round trip is not trivially zeros/ones
    m.load_state_dict({k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sd.items()})
    return m


@pytest.mark.parametrize("name", CASES)
def test_save_pretrained_round_trip(tmp_path, name):
    m = _model(name)
    x = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 12))
    hf = StackformerForCausalLM.from_stackformer(m)
    with torch.no_grad():
        got = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(got, m(x).logits, atol=1e-5, rtol=1e-5)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "stackformer" and cfg["stackformer"] == m.config.to_dict()
    again = StackformerForCausalLM.from_pretrained(tmp_path)
    for k, v in hf.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    back = again.to_stackformer()
    assert back.config == m.config
    np.testing.assert_array_equal(back(x).logits, m(x).logits)


def test_auto_classes_and_loss_with_labels(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    m = _model("attnres_block+moda")
    StackformerForCausalLM.from_stackformer(m).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), StackformerConfig)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, StackformerForCausalLM)
    x = np.random.default_rng(1).integers(0, BASE["vocab_size"], (3, 10))
    out = auto(input_ids=torch.from_numpy(x), labels=torch.from_numpy(x))
    want = m.forward_backward(x[:, :-1], x[:, 1:])
    assert abs(float(out.loss.detach()) - want) < 1e-5
    # a padding mask is passed through as stackformer's key_padding_mask
    mask = np.ones_like(x)
    mask[:, -3:] = 0
    with torch.no_grad():
        got = auto(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(got, m(x, key_padding_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs_and_config():
    m = _model("plain")
    hf = StackformerForCausalLM.from_stackformer(m)
    with pytest.raises(ValueError, match="exactly one"):
        hf()
    with pytest.raises(ValueError, match="residual"):
        StackformerConfig(stackformer={**BASE, "residual": "nope"})
