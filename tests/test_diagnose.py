"""The `fast` preset's block-by-block diagnosis (`python -m wanserve.engine.diagnose`) on the tiny model: it measures
each low-bit part alone, and when something turns non-finite it names where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wanserve.engine.speed as speed
from wanserve.engine.diagnose import Report, diagnose, main
from wanserve.engine.fp8 import Fp8Linear
from wanserve.engine.loading import load_pipeline
from wanserve.engine.speed import DeviceInfo

CPU = DeviceInfo(type="cpu", name="cpu")


def run_tiny(model_cache: Path) -> Report:
    pipe = load_pipeline("tiny", model_cache, torch.float32)
    expert = pipe.transformer
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn((1, expert.config.in_channels, 3, 16, 24), generator=gen)
    text = torch.randn((2, 16, expert.config.text_dim), generator=gen)
    inputs = {"hidden_states": torch.cat([latents, latents]), "timestep": torch.tensor([900, 900]),
              "encoder_hidden_states": text}  # fmt: skip
    return diagnose(expert, inputs, torch.device("cpu"), CPU, compile_dir=None, emit=lambda _line: None)


def test_cli_reports_every_block_and_the_chained_error(model_cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "diagnose.json"
    args = ["--size", "480p", "--frames", "9", "--no-compile", "--cache-dir", str(model_cache), "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    layers = load_pipeline("tiny", model_cache, torch.float32).transformer.config.num_layers
    assert [row["index"] for row in doc["blocks"]] == list(range(layers))
    for row in doc["blocks"]:
        outcomes = row["outcomes"]
        assert list(outcomes) == ["copy", "FP8 linears", "low-bit attention", "fast block"]  # no cuDNN on a CPU
        assert all(o["finite"] for o in outcomes.values()), row
        # The harness feeds each copy exactly the block's input: an unchanged copy agrees to the bit.
        assert outcomes["copy"]["update_error"] == 0.0
        for name in ("FP8 linears", "low-bit attention", "fast block"):
            assert 0 < outcomes[name]["update_error"] < 0.2, (name, row)
        assert f"| {row['index']} |" in printed
    assert [c["name"] for c in doc["chained"]] == ["fast (eager)"]
    fast = doc["chained"][0]
    assert fast["finite"] and 0 < fast["rel_error"] < 0.10 and fast["first_bad_block"] is None


def test_a_non_finite_linear_is_named_with_its_block(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Fp8Linear.forward

    def broken_ffn_out(self: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        # The FFN's second linear is the only one whose input is the FFN width.
        return out * float("nan") if self.in_features == 64 else out

    monkeypatch.setattr(Fp8Linear, "forward", broken_ffn_out)
    report = run_tiny(model_cache)
    for row in report.blocks:
        for name in ("FP8 linears", "fast block"):
            outcome = row.outcomes[name]
            assert not outcome.finite
            assert outcome.first_bad == "ffn.net.2 (Fp8Linear; its input was finite)", outcome
        assert row.outcomes["low-bit attention"].finite
    assert "NOT FINITE: ffn.net.2" in report.table()
    fast = report.chained[-1]
    assert not fast.finite and fast.first_bad_block == 0


def test_a_non_finite_attention_product_is_traced_to_before_the_output_projection(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = speed.lowbit_attention
    monkeypatch.setattr(speed, "lowbit_attention", lambda q, k, v: original(q, k, v) * float("inf"))
    report = run_tiny(model_cache)
    for row in report.blocks:
        assert row.outcomes["FP8 linears"].finite
        assert row.outcomes["low-bit attention"].first_bad == (
            "attn1.to_out.0 (Linear; its input was not finite already)"
        )
        assert row.outcomes["fast block"].first_bad == "attn1.to_out.0 (Fp8Linear; its input was not finite already)"
    assert report.chained[-1].first_bad_block == 0
