"""Falcon's 4-bit layers. transformers 5 converts to bitsandbytes only modules whose type *is* nn.Linear
(integrations/bitsandbytes.py, replace_with_bnb_linear); Falcon builds its dense layers as FalconLinear, a
subclass, so the Falcon seed job (QLoRA nf4 + double quant) loaded none of them in 4 bits. dsum builds them
as plain nn.Linear while a quantized Falcon loads (model.plain_linear_layers), on a tiny Falcon built from
the seed's architecture (architectures.build_tiny), through transformers' real loader and bitsandbytes."""

from __future__ import annotations

from collections import Counter

import pytest
import ray
import torch
from conftest import JOBS, dsum_here

from dsum import config, plan
from dsum import model as models
from dsum.architectures import build_tiny

FALCON = JOBS / "falcon-7b-samsum-qlora.yaml"


@pytest.fixture(scope="module")
def tiny_falcon(tmp_path_factory):
    return build_tiny("tiiuae/falcon-7b", tmp_path_factory.mktemp("falcon") / "tiny-falcon")


def _kinds(model) -> Counter:
    return Counter(type(m).__name__ for m in model.modules())


def test_every_falcon_dense_layer_loads_in_4_bits_and_nothing_leaks(tiny_falcon):
    job = config.load(FALCON, [f"model.name={tiny_falcon}"])
    quantized = models.load_base(job.model, job.method)
    kinds = _kinds(quantized)
    assert kinds["Linear4bit"] == 4 * 2 and kinds["FalconLinear"] == 0  # 4 dense layers in each of 2 blocks
    assert quantized.lm_head.__class__ is torch.nn.Linear  # the head stays, as transformers leaves it
    # the same layers compute what FalconLinear computes: a float load with the swap matches one without
    x = torch.randint(0, 100, (1, 12))
    float_job = config.load(FALCON, [f"model.name={tiny_falcon}", "method.name=lora", "method.bits=null"])
    plain = models.load_base(float_job.model, float_job.method)
    with models.plain_linear_layers("falcon"):
        swapped = models.load_base(float_job.model, float_job.method)
    assert _kinds(swapped)["FalconLinear"] == 0 and _kinds(plain)["FalconLinear"] == 8  # no leak after the swap
    with torch.no_grad():
        assert torch.allclose(plain(x).logits.float(), swapped(x).logits.float(), atol=1e-2)


def test_a_quantization_that_cannot_apply_is_one_line_before_ray(tiny_falcon, tmp_path, monkeypatch):
    """Preflight runs transformers' own bitsandbytes quantizer on the weightless model: without dsum's
    FalconLinear handling it would quantize nothing, and that is one line before Ray starts (it used to be a
    worker's traceback, with the cluster up)."""
    monkeypatch.setattr(models, "LINEAR_SUBCLASSES", {})
    ray.shutdown()  # (a run earlier in this test process may have joined the session's cluster: Ray starts anew here)
    proc = dsum_here("train", FALCON, f"model.name={tiny_falcon}", "data.source=bundled", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsum: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"method.bits: '{tiny_falcon}' has no layer bitsandbytes could quantize to 4 bits" in errors[0]
    assert not ray.is_initialized() and list(tmp_path.iterdir()) == []


def test_the_falcon_seed_plan_counts_its_4bit_layers_as_loading_makes_them():
    """The seed job's plan (meta device, the real shape) with the layers as the 4-bit load builds them: the
    write-up's trainable parameters, and every dense layer's weights in 4 bits."""
    job = config.load(FALCON)
    result = plan.plan(job, memory=True)
    assert result["trainable_params"] == 32_636_928
    skeleton = plan.meta_model(job)
    assert _kinds(skeleton)["FalconLinear"] == 0 and _kinds(skeleton)["Linear"] == 32 * 4 + 1
