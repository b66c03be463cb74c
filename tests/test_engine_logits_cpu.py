"""bench.engine_logits' comparison on saved logits (the engine part runs on the GPU machine)."""

import torch

from bench import engine_logits


def _save(path, mode, logits):
    torch.save({"mode": mode, "logits": logits}, path)
    return path


def test_compare_passes_within_bf16_and_fails_outside(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    base = {"bs1-prefill": torch.randn(1, 50, generator=gen), "bs8-decode1": torch.randn(8, 50, generator=gen)}
    near = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    far = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    off = _save(tmp_path / "off.pt", "off", base)
    assert engine_logits.compare([off, _save(tmp_path / "on.pt", "measure", near)])
    assert "| measure | bs8-decode1 |" in capsys.readouterr().out
    assert not engine_logits.compare([off, _save(tmp_path / "bad.pt", "triton", far)])
    assert "| NO |" in capsys.readouterr().out


def test_compare_flags_a_missing_step(tmp_path, capsys):
    base = {"bs1-prefill": torch.randn(1, 10), "bs1-decode1": torch.randn(1, 10)}
    off = _save(tmp_path / "off.pt", "off", base)
    partial = _save(tmp_path / "p.pt", "measure", {"bs1-prefill": base["bs1-prefill"].clone()})
    assert not engine_logits.compare([off, partial])
    assert "| measure | bs1-decode1 | missing |" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit):
        engine_logits.main(["compare", "only-one.pt"])
    with pytest.raises(SystemExit):
        engine_logits.main(["run", "--model-path", "m", "--out", "o.pt", "--batch-sizes", "0"])
