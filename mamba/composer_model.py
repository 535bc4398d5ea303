"""The ComposerModel: MambaLMHeadModel + masked cross entropy, metrics, FLOPs, FSDP hooks.

One of only two files that import Composer (with mamba/train.py). FSDP wrapping, activation
checkpointing and meta-device init are attached from here; the model itself knows none of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.flops import training_flops
from mamba.model.lm import Block
from mamba.model.loss import IGNORE_INDEX, LMLoss


class TokenAccuracy(Metric):
    """Fraction of labelled positions (label != -100) whose argmax prediction is right."""

    full_state_update = False

    def __init__(self, dist_sync_on_step: bool = False):
        super().__init__(dist_sync_on_step=dist_sync_on_step)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor | LMLoss, labels: torch.Tensor) -> None:
        if isinstance(logits, LMLoss):  # a training step's counts: no logits were kept
            self.correct += logits.n_correct
            self.total += logits.n_tokens
            return
        mask = labels != IGNORE_INDEX
        self.correct += ((logits.argmax(-1) == labels) & mask).sum()
        self.total += mask.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def return_large_frees_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """CPU training: have glibc serve every allocation above threshold_bytes with its own mmap,
    returned to the OS when freed. By default glibc raises that threshold (up to 32 MB) as soon as
    a large block is freed, so a step's 6-25 MB activations then live in the heap, and the holes
    they leave are rarely reusable: a mamba2-130m step at 2048 tokens peaked at 1.3-1.6x its
    tensors (bench/bench_memory.py), about 1.05x with this. glibc only; returns False elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt(-3, int(threshold_bytes)) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def attach_parallelism_hooks(model: MambaLMHeadModel, wrap_blocks: bool,
                             checkpoint_blocks: bool) -> None:
    """Composer looks for these on the ComposerModel's direct children."""
    model.fsdp_wrap_fn = lambda module: wrap_blocks and isinstance(module, Block)
    model.activation_checkpointing_fn = lambda module: checkpoint_blocks and isinstance(module, Block)
    model.param_init_fn = model.init_module


def apply_block_checkpointing(model: MambaLMHeadModel) -> None:
    """Recompute each block in backward (without FSDP; with FSDP, Composer applies it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        model, check_fn=lambda module: isinstance(module, Block),
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT))


class ComposerMamba(ComposerModel):
    def __init__(self, config: MambaConfig, fsdp_layer_wrap: bool = True,
                 activation_checkpointing: bool = False, model: MambaLMHeadModel | None = None):
        super().__init__()
        self.model = model if model is not None else MambaLMHeadModel(config)
        self.config = config
        attach_parallelism_hooks(self.model, fsdp_layer_wrap, activation_checkpointing)
        self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                              "TokenAccuracy": TokenAccuracy()}
        self.eval_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                             "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
                             "TokenAccuracy": TokenAccuracy()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | LMLoss:
        """Training (train mode, labels given): the loss and metric counts as an LMLoss, computed
        without ever holding [tokens, vocab] logits. Otherwise logits over the real vocabulary."""
        if self.training and "labels" in batch:
            return self.model(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=batch["labels"])
        logits = self.model(batch["input_ids"], seq_idx=batch.get("seq_idx"))
        return logits[..., :self.config.vocab_size]

    def loss(self, outputs: torch.Tensor | LMLoss, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross entropy over the positions whose label is not -100."""
        if isinstance(outputs, LMLoss):
            return outputs.loss
        labels = batch["labels"]  # logits from an eval-mode forward
        return F.cross_entropy(outputs.float().reshape(-1, outputs.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch, outputs, metric: Metric) -> None:
        labels = batch["labels"]
        if isinstance(outputs, LMLoss):  # after a training step (Composer's train metrics)
            if isinstance(metric, LanguageCrossEntropy):
                metric.sum_loss += outputs.loss_sum
                metric.total_items += outputs.n_tokens
                metric._update_count += 1  # what Metric.update records (else compute() warns)
                metric._computed = None
            elif isinstance(metric, TokenAccuracy):
                metric.update(outputs, labels)
            else:
                raise TypeError(f"{type(metric).__name__} needs logits; a training step keeps none")
            return
        if isinstance(metric, TokenAccuracy):
            metric.update(outputs, labels)
        else:
            metric.update(outputs.float(), labels)

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        b, length = batch["input_ids"].shape
        return training_flops(self.config, b, length)
