"""The shared wiring list (tests/conftest.py) covers every depth wiring the Config accepts."""
from conftest import WIRINGS
from stackformer.config import CHOICES


def test_every_wiring_is_listed():
    listed = {kw.get("residual", "plain") for kw in WIRINGS.values()}
    assert listed == set(CHOICES["residual"])
