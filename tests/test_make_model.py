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


def test_the_ramp_keeps_the_share_of_bare_answers_and_puts_them_last():
    from scratchpad.cluster.make_model import direct_share
    from scratchpad.common.config import load_config

    for fraction, first, last in ((0.5, 0.0, 1.0), (0.75, 0.5, 1.0), (0.25, 0.0, 0.5)):
        tiny = load_config(None, [f"model.tiny.warmstart_direct_fraction={fraction}", "model.tiny.warmstart_direct_schedule=ramp",
                                  "model.tiny.warmstart_steps=401"]).model.tiny
        shares = [direct_share(tiny, s) for s in range(401)]
        assert abs(sum(shares) / len(shares) - fraction) < 1e-9
        assert abs(shares[0] - first) < 1e-9 and abs(shares[-1] - last) < 1e-9
        assert shares == sorted(shares)
    constant = load_config(None, ["model.tiny.warmstart_direct_fraction=0.3"]).model.tiny
    assert {direct_share(constant, s) for s in range(150)} == {0.3}
