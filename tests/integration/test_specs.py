"""One mechanism for every torchtitan decoder (parallel/specs.py), checked in one process.

For each family's debug flavor: the model built from the family's own spec, its head
swapped by the fused spec's parallelize_fn, must give the baseline's loss and the
gradient of every parameter (fp32 on CPU, same weights), with the model's own forward
ending in the head. Plus: what "off" leaves alone, the flavors, the refusals.
"""

import copy
import dataclasses
import glob
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec

from parallel.fused_head import FusedCELoss, FusedLMHead
from parallel.specs import (ALIASES, EXTRA_FLAVORS, FAMILIES, JobRefused, fused_train_spec,
                            register_train_specs, served_model_args)
from parallel.train import check_job

register_train_specs()

# Each family's CPU debug flavor; gpt_oss keeps its full vocabulary even there.
DEBUG_FLAVORS = [(f, "debugmodel") for f in FAMILIES] + [("qwen3", "debugmodel_moe")]


def parse(*args: str, config: str = "debug_model"):
    return ConfigManager().parse_args(["--job.custom_config_module=parallel.config", "--job.config_file",
                                       str(ROOT / "train_configs" / f"{config}.toml"), *args])


class _Dims:
    tp_enabled = False


def build(family: str, flavor: str, fused: bool, seed: int = 0):
    """The family's model, initialised by its own init_weights (seeded), head swapped if `fused`."""
    spec = get_train_spec(family)
    job = parse("--model.name", family, "--model.flavor", flavor, "--training.seq_len", "16",
                *(("--fused_ce.enable", "--fused_ce.backend", "torch") if fused else ()))
    args = copy.deepcopy(spec.model_args[flavor])
    args.update_from_config(job)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = spec.model_cls(args)
    # The fused spec's parallelize_fn with the family's own parallelize replaced by a no-op
    # (one CPU process: nothing to shard); the swap itself is what runs in a real job.
    no_op = dataclasses.replace(spec, parallelize_fn=lambda m, d, j: m)
    fused_train_spec(no_op).parallelize_fn(model, _Dims(), job)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model.float(), spec.build_loss_fn(job), job


def masks(model, tokens) -> dict:
    """The attention masks a flex-attention model takes (gpt_oss: causal, no tokenizer needed)."""
    if getattr(model.model_args, "attn_type", "sdpa") == "sdpa":
        return {}
    return {"attention_masks": model.get_attention_masks(input_batch=tokens, tokenizer=None)}


def run_step(model, loss_fn, seed: int = 1):
    """One forward + backward on fixed random tokens and labels (3 ignored); (loss, grads)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.output.weight.shape[0]
    tokens = torch.randint(0, min(vocab, 2000), (2, 16), generator=g)
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    labels[0, :3] = -100
    if isinstance(model.output, FusedLMHead):
        model.output.expect_labels(labels)
    loss = loss_fn(model(tokens, **masks(model, tokens)), labels)
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family, flavor", DEBUG_FLAVORS)
def test_every_family_matches_its_baseline(family, flavor):
    """Loss and every parameter's gradient, fused vs the family's own head + cross-entropy, both
    fp32, each against the baseline run in fp64: the fused head is no less accurate."""
    base, base_loss_fn, _ = build(family, flavor, fused=False)
    fused, fused_loss_fn, _ = build(family, flavor, fused=True)
    assert isinstance(fused.output, FusedLMHead) and isinstance(fused_loss_fn, FusedCELoss)
    assert type(base.output) is torch.nn.Linear
    # Same names, same values: a baseline checkpoint loads into the fused model and back.
    assert list(base.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(base.state_dict())
    reference = copy.deepcopy(base).double()

    ref_loss, ref = run_step(reference, base_loss_fn)
    eager_loss, eager = run_step(base, base_loss_fn)
    got_loss, got = run_step(fused, fused_loss_fn)

    assert abs(got_loss - ref_loss) <= 1e-6 * ref_loss
    assert set(got) == set(ref)

    def error(grads, name=None):
        names = [name] if name else list(ref)
        diff = sum((grads[n] - ref[n]).norm() ** 2 for n in names) ** 0.5
        return diff / sum(ref[n].norm() ** 2 for n in names) ** 0.5

    # fp32 round-off differs by summation order; MoE layers amplify it (eager's own error
    # reaches ~4e-4 on a router there), so each is bounded by eager's error, not a constant.
    assert error(got) <= 1.5 * error(eager) + 1e-7, (error(got), error(eager))
    for name in ref:
        assert error(got, name) <= 2 * error(eager, name) + 1e-6, (name, error(got, name), error(eager, name))


def test_tied_flavor_shares_one_parameter():
    """qwen3's tied head: the fused head's weight is the embedding's Parameter, so its
    gradient (head + embedding) lands on the one shared parameter, as in the baseline."""
    model, _, _ = build("qwen3", "debugmodel", fused=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" not in dict(model.named_parameters())  # deduplicated, as the baseline's


def test_a_forward_without_fresh_labels_is_refused():
    model, _, _ = build("llama3", "debugmodel", fused=True)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    model.output.expect_labels(torch.zeros(1, 4, dtype=torch.long))
    model(tokens)
    with pytest.raises(RuntimeError, match="without labels"):
        model(tokens)  # the labels were consumed: never reused


def test_loss_fn_refuses_logits():
    with pytest.raises(RuntimeError, match=r"shape \(2, 3, 5\).*self.output\(h\)"):
        FusedCELoss()(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_the_family_unchanged(family):
    """With the fused head off, each derived function hands its arguments to the family's own."""
    job = parse("--model.name", family)
    derived = get_train_spec(family)
    calls = []
    spec = fused_train_spec(dataclasses.replace(
        derived, parallelize_fn=lambda *a: calls.append(("parallelize", a)) or "P",
        build_loss_fn=lambda *a, **k: calls.append(("loss", a, k)) or "L",
        pipelining_fn=lambda *a, **k: calls.append(("pp", a, k)) or "S"))
    model = torch.nn.Linear(2, 3)
    assert spec.parallelize_fn(model, _Dims(), job) == "P" and type(model) is torch.nn.Linear
    assert spec.build_loss_fn(job, parallel_dims=None) == "L"
    assert spec.pipelining_fn(model, None, job, 1, 2) == "S"
    assert [c[0] for c in calls] == ["parallelize", "loss", "pp"]
    assert calls[0][1][0] is model and calls[0][1][2] is job and calls[1][2] == {"parallel_dims": None}


def test_each_family_is_served_under_its_own_name():
    from torchtitan.models import _supported_models

    for family in FAMILIES:
        assert family in _supported_models
        spec = get_train_spec(family)
        assert spec.parallelize_fn.func.__name__ == "_parallelize", family
        # The family's own model class, parallelize function and state-dict adapter.
        assert spec.parallelize_fn.args[0].__module__.startswith(f"torchtitan.models.{family}"), family
        assert spec.model_cls.__module__.startswith(f"torchtitan.models.{family}"), family
        assert spec.state_dict_adapter.__module__.startswith(f"torchtitan.models.{family}"), family
    for alias, family in ALIASES.items():
        assert get_train_spec(alias) is get_train_spec(family)


def test_pipelining_backstop_raises_the_same_message():
    job = parse("--fused_ce.enable", "--parallelism.pipeline_parallel_degree", "2")
    with pytest.raises(JobRefused) as refused:
        check_job(job)
    with pytest.raises(ValueError) as backstop:
        get_train_spec("llama3").pipelining_fn(None, None, job, None, None, None, None)
    assert str(backstop.value) == str(refused.value)
    for words in ("fused_ce", "pipeline_parallel_degree", "--fused_ce.no-enable",
                  "--parallelism.pipeline_parallel_degree 1"):
        assert words in str(refused.value)
    # Families torchtitan never pipelines keep their None (torchtitan's own refusal).
    assert get_train_spec("qwen3").pipelining_fn is None


class _NoHead(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


class _BiasHead(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.output = torch.nn.Linear(4, 8, bias=True)


class _GoodHead(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.output = torch.nn.Linear(4, 8, bias=False)


class _NeedsMore(torch.nn.Module):
    def __init__(self, args):
        raise AttributeError("'Args' object has no attribute 'moe_impl'")


@pytest.mark.parametrize("name, cls, missing", [
    ("custom_needs_more", _NeedsMore, "building it on the meta device to find its LM head failed"),
    ("custom_no_head", _NoHead, "has no `output`"),
    ("custom_bias_head", _BiasHead, "nn.Linear(dim, vocab, bias=False)"),
    ("custom_good_head", _GoodHead, "parallel.specs.fused_train_spec"),
])
def test_models_the_head_cannot_serve_are_named(name, cls, missing):
    from torchtitan.models import llama3

    base = llama3.get_train_spec()  # torchtitan's own, not derived by fused_train_spec
    try:
        register_train_spec(name, dataclasses.replace(base, model_cls=cls))
    except ValueError:
        pass  # registered by an earlier parametrization in this process
    with pytest.raises(JobRefused) as e:
        served_model_args(name, "debugmodel")
    assert f"model.name={name!r}" in str(e.value) and missing in str(e.value)
    assert "--fused_ce.no-enable" in str(e.value)


def test_flux_and_unknown_names_are_refused():
    with pytest.raises(JobRefused, match="model.name='flux'"):  # its spec needs transformers; no LM head
        served_model_args("flux", "debugmodel")
    with pytest.raises(JobRefused, match="model.name='no_such_model' is not a model torchtitan knows; the "
                                         "fused head serves llama3, llama4, qwen3, deepseek_v3, gpt_oss"):
        served_model_args("no_such_model", "debugmodel")
    with pytest.raises(JobRefused, match="model.flavor 'huge' is not a flavor of model.name='qwen3'"):
        served_model_args("qwen3", "huge")


def test_registered_flavors_have_the_documented_shapes():
    expected = {  # family, flavor: (dim, layers, vocab, experts or None)
        ("llama3", "1B"): (2048, 16, 128256, None),
        ("llama4", "1Bx8e"): (1024, 16, 202048, 8),
        ("deepseek_v3", "1B"): (1024, 16, 129280, 8),
        ("gpt_oss", "1b"): (1024, 12, 201088, 8),
    }
    assert {(f, n) for f, flavors in EXTRA_FLAVORS.items() for n in flavors} == set(expected)
    for (family, flavor), (dim, layers, vocab, experts) in expected.items():
        args = get_train_spec(family).model_args[flavor]
        moe = getattr(args, "moe_args", None)
        assert (args.dim, args.n_layers, args.vocab_size) == (dim, layers, vocab), family
        assert (moe.num_experts if experts else None) == experts, family
    assert get_train_spec("qwen3").model_args["1.7B"].enable_weight_tying  # stock, tied


CONFIGS = sorted(Path(p).stem for p in glob.glob(str(ROOT / "train_configs" / "*.toml")))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_parse_and_pass_the_checks(name):
    job = parse("--fused_ce.enable", config=name)
    check_job(job)
    assert job.model.name in FAMILIES  # torchtitan's own model names, nothing renamed
    assert job.metrics.enable_tensorboard and job.metrics.save_tb_folder == "tb"
    assert job.job.dump_folder == f"./outputs/{name}"
    assert job.training.dataset == "embedded"


def test_every_family_has_a_cpu_and_a_gpu_config():
    for family in FAMILIES:
        jobs = [parse(config=n) for n in CONFIGS]
        mine = [j for j in jobs if j.model.name == family]
        assert any(j.training.mixed_precision_param == "float32" for j in mine), family
        assert any(get_train_spec(family).model_args[j.model.flavor].vocab_size >= 100_000
                   and j.training.seq_len >= 4096 for j in mine), family
