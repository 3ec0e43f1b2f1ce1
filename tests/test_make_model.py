"""The tiny model's warm start repeats: the same config builds the same weights, whatever the caller's thread count."""
import torch
from safetensors.torch import load_file

from conftest import small_config


def test_warm_start_is_deterministic_across_caller_thread_counts(tmp_path):
    from scratchpad.cluster.make_model import make_model

    built = []
    before = torch.get_num_threads()
    for threads, where in ((1, "a"), (2, "b")):
        torch.set_num_threads(threads)  # the build fixes its own (model.tiny.warmstart_threads)
        cfg = small_config(tmp_path / where, "model.tiny.warmstart_steps=8")
        built.append(load_file(make_model(cfg, log=lambda *_: None) / "model.safetensors"))
        assert torch.get_num_threads() == threads, "the caller's thread count comes back"
    torch.set_num_threads(before)
    assert built[0].keys() == built[1].keys()
    for name in built[0]:
        assert torch.equal(built[0][name], built[1][name]), name
    moved = small_config(tmp_path / "c", "model.tiny.warmstart_steps=8", "model.tiny.seed=1")
    other = load_file(make_model(moved, log=lambda *_: None) / "model.safetensors")
    assert any(not torch.equal(other[n], built[0][n]) for n in other), "another seed builds another model"
