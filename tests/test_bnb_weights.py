"""4-bit / 8-bit weights through bitsandbytes (its CPU backend here): modules swapped, logits close to 16-bit."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from edgectx.engine import Engine
from edgectx.errors import UsageError
from edgectx.quant.linear import linear_factory, resolve_weights
from edgectx.quant.bnb_linear import linear_weight_bytes
from tiny_gguf import write_tiny_gguf

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("bnb") / "tiny.gguf", arch="llama", dim=128, ffn_dim=256, seed=0)


@pytest.fixture(scope="module")
def logits(tiny):
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 258, 200)]
    out, engines = {}, {}
    for weights in ("fp16", "nf4", "int8"):
        engines[weights] = Engine.load(tiny, device="cpu", weights=weights)
        with torch.inference_mode():
            out[weights] = engines[weights].forward(ids, all_logits=True)
    return out, engines


def _errors(out, weights):
    ref = out["fp16"]
    top1 = float((out[weights].argmax(-1) == ref.argmax(-1)).float().mean())
    max_rel = float((out[weights] - ref).abs().max() / ref.abs().max())
    return top1, max_rel


def test_nf4_and_int8_logits_stay_close_to_16_bit(logits):
    out, _ = logits
    # measured (seeds 0-3, 200 tokens): nf4 top-1 0.975-1.0, max relative error 0.18-0.34; int8 0.995-1.0, 0.022-0.041
    nf4_top1, nf4_rel = _errors(out, "nf4")
    int8_top1, int8_rel = _errors(out, "int8")
    assert nf4_top1 >= 0.95 and nf4_rel < 0.45
    assert int8_top1 >= 0.98 and int8_rel < 0.08
    assert 0.01 < int8_rel < nf4_rel  # both really quantize, and 4 bits lose more than 8


def test_layers_are_swapped_for_bitsandbytes_and_weigh_less(logits):
    _, engines = logits
    fp16, nf4, int8 = (engines[w].model.layers[0] for w in ("fp16", "nf4", "int8"))
    assert isinstance(nf4.ffn.w_gate_up, bnb.nn.Linear4bit) and nf4.ffn.w_gate_up.weight.quant_type == "nf4"
    assert isinstance(int8.attn.wqkv, bnb.nn.Linear8bitLt) and int8.attn.wqkv.weight.dtype == torch.int8
    dense = linear_weight_bytes(fp16.ffn.w_gate_up)
    assert dense == 512 * 128 * 2
    assert dense / linear_weight_bytes(nf4.ffn.w_gate_up) > 3.5  # 4 bits + double-quantized absmax per 64
    assert 1.9 < dense / linear_weight_bytes(int8.ffn.w_gate_up) <= 2.0
    # the output projection stays 16-bit, as transformers' bitsandbytes loading keeps lm_head
    assert not isinstance(engines["nf4"].model.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert (engines["fp16"].weights, engines["nf4"].weights, engines["int8"].weights) == ("fp16", "nf4", "int8")


def test_factory_builds_a_linear_with_bias():
    weight, bias = torch.randn(96, 64) * 0.05, torch.randn(96)
    layer = linear_factory(torch.device("cpu"), torch.float32, weights="nf4")(weight, bias)
    x = torch.randn(3, 64)
    rel = float((layer(x) - (x @ weight.T + bias)).norm() / (x @ weight.T + bias).norm())
    assert 0.001 < rel < 0.05, rel


def test_missing_bitsandbytes_is_one_sentence(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(UsageError, match=r"need bitsandbytes, which is not installed: `pip install bitsandbytes`"):
        Engine.load(tiny, device="cpu", weights="int8")
    with pytest.raises(UsageError, match="pip install bitsandbytes"):
        linear_factory(torch.device("cpu"), torch.float32, weights="nf4")
    assert resolve_weights(torch.device("cuda"), "auto") == "fp16"  # auto falls back to 16-bit without it
    assert resolve_weights(torch.device("cpu"), "auto") == "fp16"


def test_auto_picks_nf4_on_cuda_for_big_models_when_bitsandbytes_is_there():
    assert resolve_weights(torch.device("cuda"), "auto") == "nf4"
    assert resolve_weights(torch.device("cuda"), "auto", fp16_bytes=16 << 30) == "nf4"  # an 8B model
    assert resolve_weights(torch.device("cuda"), "auto", fp16_bytes=270 << 20) == "fp16"  # SmolLM2-135M: not worth 4 bits
    assert resolve_weights(torch.device("cuda"), "nf4", fp16_bytes=270 << 20) == "nf4"  # asked for explicitly
    assert resolve_weights(torch.device("cuda"), "fp16") == "fp16"
    with pytest.raises(UsageError, match="must be one of auto, gguf, fp16, nf4, int8"):
        resolve_weights(torch.device("cpu"), "q4")


def test_cli_reports_missing_bitsandbytes(tiny, monkeypatch, capsys):
    from edgectx.cli.main import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(tiny), "--weights", "nf4", "--prompt", "hi", "--no-history"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgectx: 4-bit and 8-bit weights need bitsandbytes")


@pytest.mark.gpu
def test_nf4_on_cuda_matches_16_bit(tiny):
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 258, 200)]
    out = {}
    for weights in ("fp16", "nf4"):
        engine = Engine.load(tiny, device="cuda", weights=weights)
        with torch.inference_mode():
            out[weights] = engine.forward(ids, all_logits=True).float().cpu()
    top1, rel = _errors(out, "nf4")
    assert top1 >= 0.95 and rel < 0.45


def test_config_file_sets_the_weight_format(tmp_path, tiny):
    from edgectx.config import load_config
    from edgectx.cli.options import load_engine
    from edgectx.cli.main import build_parser
    from rich.console import Console

    path = tmp_path / "config.toml"
    path.write_text('weights = "int8"\n')
    config = load_config(path)
    assert config.weights == "int8" and "weights" not in config.extra
    args = build_parser().parse_args(["chat", "--model", str(tiny)])
    assert load_engine(args, config, Console(quiet=True)).weights == "int8"
    args = build_parser().parse_args(["chat", "--model", str(tiny), "--weights", "fp16"])  # the flag wins
    assert load_engine(args, config, Console(quiet=True)).weights == "fp16"
