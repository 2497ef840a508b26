"""The `llama3_fused_ce` train spec: torchtitan's llama3 with the fused LM head.

Imported at start-up by parallel.train. It also registers the embedded
datasets (`embedded`, `embedded_validation`) that the default configs use.
"""

import dataclasses
from pathlib import Path

from datasets import load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS
from torchtitan.models import llama3
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec

from parallel.fused_head import FusedCELoss, FusedLMHead
from parallel.parallelize import parallelize, pipelining

MODEL_NAME = "llama3_fused_ce"
ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"


class Transformer(llama3.Transformer):
    def forward(self, tokens, attention_masks=None, positions=None):
        if not isinstance(self.output, FusedLMHead):
            return super().forward(tokens, attention_masks, positions)
        # Fused: stop at the normed hidden states. The loss calls `self.output(h, labels)`
        # as a module of its own, so its FSDP/TP hooks run around the fused op.
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis, attention_masks=attention_masks, positions=positions)
        return self.norm(h) if self.norm is not None else h


def build_loss_fn(job_config, **kwargs):
    if job_config.fused_ce.enable:
        # Not compiled even with compile.components=["loss"]: the fused op is one opaque custom op.
        return FusedCELoss()
    return llama3.get_train_spec().build_loss_fn(job_config, **kwargs)


FLAVORS = {
    **llama3.llama3_args,
    # A 1B-class model with the Llama-3 vocabulary (Llama-3.2-1B shapes). FFN hidden:
    # int(1.5 * int(2 * 4 * 2048 / 3)) = 8191, rounded up to a multiple of 256 = 8192.
    "1B": llama3.TransformerModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        vocab_size=128256,
        rope_theta=500000,
    ),
}


def _json_split(path: str):
    return load_dataset("json", data_files=path, split="train")


DATASETS["embedded"] = DatasetConfig(
    path=str(ASSETS / "corpus" / "train.jsonl.gz"), loader=_json_split, sample_processor=lambda s: s["text"]
)
DATASETS["embedded_validation"] = DatasetConfig(
    path=str(ASSETS / "corpus" / "validation.jsonl.gz"), loader=_json_split, sample_processor=lambda s: s["text"]
)

register_train_spec(
    MODEL_NAME,
    dataclasses.replace(
        get_train_spec("llama3"),
        model_cls=Transformer,
        model_args=FLAVORS,
        parallelize_fn=parallelize,
        pipelining_fn=pipelining,
        build_loss_fn=build_loss_fn,
    ),
)
