"""A short run of the checkpoint fuzzer (fuzz/fuzz_checkpoint.py): mutated, truncated and
spliced checkpoints either load or raise ValueError/KeyError/TypeError — never anything else."""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def test_checkpoint_fuzz_short():
    spec = importlib.util.spec_from_file_location("fuzz_checkpoint", os.path.join(HERE, "..", "fuzz", "fuzz_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.run_mutation(3000, seed=1)
