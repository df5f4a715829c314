"""The GPU path proven on CPU: every preset's `run` -> `edit` -> `export` under CUDA's kernel rules (cuda_rules.py),
with its real half precision forced on, on the tiny SD-1 (epsilon), SD-2 (v) and SDXL pipelines.

The default run covers each family, half dtype, storage and tune mode; the full matrix (every preset x family x dtype,
full mode too) is marked slow: `pytest -m slow tests/test_cuda_rules.py`. What only a GPU can check is listed in the
README (development, "GPU-only").
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cuda_rules import CudaRuleError, cuda_rules

from imagic_lite import imagic as imagic_module
from imagic_lite import models
from imagic_lite.cli import main
from imagic_lite.config import MemorySettings

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
FAST = ["--embed-steps", "1", "--tune-steps", "2", "--sample-steps", "1", "--etas", "0.7", "--quiet"]


# ---------------------------------------------------------------------------------------------------------------
# The harness itself: it refuses what CUDA refuses and sees the casts CUDA autocast makes


def test_rules_refuse_what_cuda_kernels_refuse():
    x, w = torch.randn(2, 32, 4, 4, dtype=torch.bfloat16), torch.ones(32)
    F.group_norm(x, 8, w, w)  # the CPU kernel accepts the mix ...
    with cuda_rules(), pytest.raises(CudaRuleError, match="native_group_norm"):
        F.group_norm(x, 8, w, w)  # ... CUDA's reads gamma as the input's type
    with cuda_rules(), pytest.raises(CudaRuleError, match="native_layer_norm"):
        F.layer_norm(torch.randn(2, 4, dtype=torch.float16), (4,), torch.ones(4))
    with cuda_rules(), pytest.raises(CudaRuleError, match="operands of dtypes"):
        torch.baddbmm(torch.zeros(1, 2, 2), torch.randn(1, 2, 2), torch.randn(1, 2, 2, dtype=torch.bfloat16))
    with cuda_rules(), pytest.raises(CudaRuleError, match="float8"):
        torch.randn(4).to(torch.float8_e4m3fn) * 2  # CPU computes with fp8, CUDA has no such kernel
    with cuda_rules(), pytest.raises(CudaRuleError, match="several devices"):
        torch.randn(2, 2) + torch.empty(2, 2, device="meta")
    with cuda_rules() as rules:  # what CUDA accepts passes
        F.group_norm(x, 8, w.bfloat16(), w.bfloat16())
        torch.randn(3, 3)[torch.tensor([0, 2])] * torch.tensor(2.0)
    assert rules.ops > 0


def test_rules_see_what_cuda_autocast_would_pass_to_the_kernels():
    x = torch.randn(2, 32, 4, 4)
    with cuda_rules(), torch.autocast("cpu", dtype=torch.float16):
        h = F.conv2d(x, torch.randn(32, 32, 1, 1))  # lower-precision list: half on CUDA and CPU alike
        assert h.dtype == torch.float16
        out = F.group_norm(h, 8, torch.ones(32), torch.zeros(32))  # CUDA autocast: fp32 in, fp32 out
        assert out.dtype == torch.float32
        assert torch.softmax(h, dim=1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # plain CPU autocast leaves them in half: the harness differs
        assert F.group_norm(h, 8, torch.ones(32), torch.zeros(32)).dtype == torch.float16


def test_rules_catch_fp32_norms_fed_half_inputs_outside_autocast(tiny_models_16):
    """Defect 1 as it was: norms kept fp32 in a VAE run outside autocast crash on CUDA; the harness says so."""
    from imagic_lite.quant import cast_frozen

    c = models.load_components(str(tiny_models_16["sd"]), MemorySettings(weights="bf16"), torch.device("cpu"))
    cast_frozen(c.vae, torch.bfloat16)  # the old loader's treatment of the VAE
    with cuda_rules(), pytest.raises(CudaRuleError, match="native_group_norm.*bfloat16, torch.float32"):
        models.encode(c, torch.zeros(1, 3, 16, 16), "a dog")


@pytest.mark.parametrize("kind, dtype", [("sd", torch.bfloat16), ("sdxl", torch.float16)])
def test_modules_outside_autocast_hold_one_dtype(tiny_models_16, kind, dtype):
    c = models.load_components(str(tiny_models_16[kind]), MemorySettings(weights=str(dtype)[6:].replace(
        "bfloat16", "bf16").replace("float16", "fp16")), torch.device("cpu"))
    vae = torch.float32 if c.family.vae_fp16_unsafe and dtype == torch.float16 else dtype  # FIELD-NOTES §5
    assert {p.dtype for p in c.vae.parameters()} == {vae}
    for encoder in c.text_encoders:
        assert {p.dtype for p in encoder.parameters()} == {dtype}
    with cuda_rules():
        encoded = models.encode(c, torch.zeros(1, 3, 16, 16), "a dog")
        assert models.decode(c, encoded.latent).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Every preset end to end under the rules


PRESETS = ("4gb", "6gb", "8gb", "12gb", "24gb", "cpu", "paper")
HALF_PRESETS = ("4gb", "6gb", "8gb", "12gb", "24gb")  # weights = "half": bf16 or fp16 depending on the card
DEFAULT = {  # the default run's share: each family, both half dtypes, fp8 and NF4 storage, fp16 loss scaling,
    # full mode in half precision and in fp32; the rest of the matrix (43 runs, ~17 min) is marked slow
    ("sd", "4gb", "fp16", ""), ("sdxl", "8gb", "bf16", ""), ("sd-v", "24gb", "fp16", "full"),
    ("sd-v", "paper", "fp32", ""),
}


def _cases():
    for kind in ("sd", "sd-v", "sdxl"):
        for preset in PRESETS:
            dtypes = ("bf16", "fp16") if preset in HALF_PRESETS else ("fp32",)
            modes = ("", "full") if preset in ("12gb", "24gb") else ("",)  # full mode needs an unquantized base
            for dtype in dtypes:
                for mode in modes:
                    case = (kind, preset, dtype, mode)
                    yield pytest.param(*case, id="-".join(filter(None, case)),
                                       marks=() if case in DEFAULT else pytest.mark.slow)


def _cli(*args) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--debug", *map(str, args)])  # --debug: any exception propagates instead of becoming exit 1
    assert exit_info.value.code == 0


def force_half(monkeypatch, dtype: str) -> None:
    """Resolve weights = "half" to `dtype`, as a card with (bf16) or without (fp16) native bf16 would."""
    real = models.compute_dtype
    monkeypatch.setattr(models, "compute_dtype", lambda w, d: HALF[dtype] if w == "half" else real(w, d))


@pytest.fixture(autouse=True)
def no_gc_per_stage(monkeypatch):
    """Each stage's memory measurement starts with gc.collect(), ~1 s in a long pytest process: not tested here."""
    from imagic_lite import memory

    monkeypatch.setattr(memory.gc, "collect", lambda *args: 0)


@pytest.mark.parametrize("kind, preset, dtype, mode", list(_cases()))
def test_preset_runs_edits_and_exports_under_cuda_rules(tiny_models_16, photo, tmp_path, monkeypatch, kind, preset,
                                                        dtype, mode):
    if dtype in HALF:
        force_half(monkeypatch, dtype)
    model = tiny_models_16[kind]
    out = tmp_path / "run"
    with cuda_rules() as rules:
        _cli("run", photo, "a dog", "--model", model, "--preset", preset, "--device", "cpu", "--out", out, *FAST,
             *(["--mode", mode] if mode else []))
        report = json.loads((out / "run.json").read_text())
        assert report["compute_dtype"] == str(HALF.get(dtype, torch.float32))[6:]
        assert report["preset"]["tune"]["mode"] == (mode or ("full" if preset == "paper" else "lora"))
        bundle = out / "photo.imagic.safetensors"
        _cli("edit", bundle, "--preset", preset, "--device", "cpu", "--out", tmp_path / "edit", "--etas", "0.5",
             "--sample-steps", "1", "--quiet", "--auto-eta")  # the eta judge too: VAE encode, base-model UNet
        assert len(list((tmp_path / "edit").glob("*.png"))) >= 1
        assert json.loads((tmp_path / "edit" / "run.json").read_text())["auto_eta"]["eta"] == 0.5
        if report["preset"]["tune"]["mode"] == "lora":
            _cli("export", bundle, tmp_path / "kohya", "--to", "kohya")
            _cli("export", bundle, tmp_path / "diffusers", "--to", "diffusers")
            assert (tmp_path / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert rules.ops > 1000


# ---------------------------------------------------------------------------------------------------------------
# fp16 loss scaling: scaled steps, skipped steps, and a resume that ends where an uninterrupted run ends


def test_fp16_resume_with_skipped_steps_is_exact(tiny_models_16, photo, tmp_path, monkeypatch):
    from imagic_lite.api import Imagic
    from imagic_lite.errors import Interrupted
    from imagic_lite.imagic import StopFlag

    force_half(monkeypatch, "fp16")
    real = imagic_module._scaler
    scalers: list[torch.amp.GradScaler] = []

    def scaler(c):  # the real one, but starting 2**28 high: its first steps overflow fp16 and are skipped
        assert real(c).is_enabled()  # fp16 on the CPU scales too
        scalers.append(torch.amp.GradScaler(c.device.type, init_scale=2.0**28, backoff_factor=2.0**-4))
        return scalers[-1]

    monkeypatch.setattr(imagic_module, "_scaler", scaler)
    overrides = {"embed": {"steps": 0}, "tune": {"steps": 4, "lora_lr": 1e-2}, "sample": {"steps": 1}}

    def fit(**kwargs):
        imagic = Imagic.from_pretrained(str(tiny_models_16["sd"]), "8gb", device="cpu", overrides=overrides)
        with cuda_rules():
            return imagic.fit(photo, "a dog", seed=1, **kwargs)

    whole = fit()
    assert scalers[-1].get_scale() < 2.0**28  # some steps were skipped ...
    assert any(v.abs().sum() > 0 for k, v in whole.weights.items() if "lora_B" in k)  # ... and some applied

    stop, checkpoint = StopFlag(), tmp_path / "ckpt.safetensors"

    def progress(event):
        if event["stage"] == "B" and event["step"] == 2:
            stop.set()

    with pytest.raises(Interrupted):
        fit(progress=progress, stop=stop, checkpoint=checkpoint)
    saved = scalers[-1].state_dict()
    assert saved["scale"] < 2.0**28
    resumed = fit(checkpoint=checkpoint, resume=True)
    assert all(torch.equal(resumed.weights[k], whole.weights[k]) for k in whole.weights)
