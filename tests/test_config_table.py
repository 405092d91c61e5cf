"""The config has one source: csrc/sf_config_fields.h. Python's Config, the binding's parsing
and C's validation must agree on every field (issue #19: they had drifted)."""
import dataclasses

import pytest

import stackformer as sf
from stackformer import _core
from stackformer.config import FIELDS

TABLE_TEXT = open(__import__("pathlib").Path(__file__).parents[1] / "csrc" / "sf_config_fields.h").read()


def test_dataclass_fields_are_the_table_in_order():
    assert [f.name for f in dataclasses.fields(sf.Config)] == [f[0] for f in FIELDS]
    # and the table the binding reports is the header's: every row appears there by name
    rows = [line for line in TABLE_TEXT.splitlines() if line.startswith("SF_FIELD(")]
    assert len(rows) == len(FIELDS)
    for row, f in zip(rows, FIELDS):
        c_name, py_name = [x.strip() for x in row[len("SF_FIELD("):].split(",")[:2]]
        assert (py_name, c_name) == (f[0], f[1])


def test_defaults_are_the_documented_ones():
    c = sf.Config()
    # written out by hand from the README's config table, not read from the code
    assert (c.vocab_size, c.d_model, c.n_heads, c.n_layers, c.max_seq_len) == (256, 128, 4, 4, 256)
    assert (c.n_kv_heads, c.d_ff) == (4, 512)
    assert (c.pos, c.activation, c.norm, c.norm_position, c.residual) == ("learned", "gelu", "layernorm", "pre", "plain")
    assert (c.norm_eps, c.attnres_eps, c.rope_theta) == (1e-5, 1e-6, 10000.0)
    assert (c.attnres_block_size, c.moda, c.moda_chunk, c.attn_dropout) == (4, False, 1, 0.0)


def test_python_and_c_agree_on_n_layers_cap():
    # C caps n_layers at 4096; Python used to accept 5000 and fail later in Model()
    sf.Config(n_layers=4096, d_model=8, n_heads=1, vocab_size=4, max_seq_len=4)
    with pytest.raises(ValueError, match=r"Config\.n_layers must be in \[1, 4096\]"):
        sf.Config(n_layers=4097)


@pytest.mark.parametrize("field,value", [("norm_eps", 0.99999999), ("attnres_eps", 1e-50), ("norm_eps", 1e39),
                                         ("rope_theta", float("inf")), ("attn_dropout", float("nan"))])
def test_float_fields_checked_after_rounding_to_float32(field, value):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        sf.Config(**{field: value})


def test_wrong_types_are_type_errors_naming_the_field():
    for field, value in [("norm_eps", "1e-5"), ("d_model", 1.0), ("moda", 2), ("rope_theta", None)]:
        with pytest.raises(TypeError, match=f"Config.{field}"):
            sf.Config(**{field: value})


def test_binding_rejects_missing_and_unknown_fields():
    kw = sf.Config()._c_kwargs()
    _core.config_validate(**kw)
    with pytest.raises(TypeError, match="unknown config field 'bogus'"):
        _core.config_validate(**kw, bogus=1)
    kw.pop("d_ff")
    with pytest.raises(TypeError, match="d_ff is missing"):
        _core.config_validate(**kw)
    with pytest.raises(ValueError, match="out of range"):
        _core.config_validate(**{**sf.Config()._c_kwargs(), "moda": 2**40})


def test_docstring_lists_every_field():
    for f in FIELDS:
        assert f"    {f[0]} (" in sf.Config.__doc__
