"""Intel's Prune OFA reference semantics, restated for the tests from the reference's code (the package,
IntelLabs/Model-Compression-Research-Package at 0dbbb2d, is archived and pins an old transformers, so it
is read, not imported). Each function names the code it restates:

- `lr_multiplier`: `model_compression_research/api_utils.py: get_linear_rewinding_schedule_with_warmup`,
  which `examples/transformers/language-modeling/run_mlm.py` calls with the *policy* window
  (`policy_begin_step`, `policy_end_step`) and `pruning_frequency`.
- `PrunedLinears`: `pruning/methods/method.py: PruningMethod` (a forward pre-hook sets
  `module.weight = weight_original * weight_mask`) with `magnitude_method.py:
  UnstructuredMagnitudePruningMethod` (mask = |original| > the k-th smallest |original|,
  k = int(sparsity * n): `methods_utils.py: calc_pruning_threshold`), and
  `schedulers/iterative_scheduler.py: IterativePruningScheduler`, stepped after every optimizer update
  (`api_utils.py: HFTrainerPruningCallback.on_step_end`).
- `pretraining_kd_loss`: `api_utils.py: HFTeacherWrapper.compute_distill_loss_callback` and
  `distiller.py: compute_cross_entropy_loss` with run_mlm.py's logit weights [1, 1] and alphas 0.5 / 0.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lr_multiplier(step: int, warmup: int, total: int, start: int, end: int, interval: int) -> float:
    prune_interval = end - start
    outside = total - prune_interval
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    if start <= step < end:
        rewind = (step - start) // interval * interval
        return max(0.0, float(outside - step + rewind) / float(max(1, outside - warmup)))
    b = prune_interval if step < start else 0.0
    return max(0.0, float(total - b - step) / float(max(1, outside - warmup)))


class PrunedLinears:
    """The reference's iterative unstructured magnitude pruning, applied to the named nn.Linear weights."""

    def __init__(self, model: nn.Module, names: list[str], *, policy: tuple[int, int], window: tuple[int, int],
                 frequency: int, initial: float, target: float) -> None:
        self.model, self.policy, self.window, self.frequency = model, policy, window, frequency
        self.initial, self.target = initial, target
        self.modules = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in names}
        self.global_step = 0
        for module in self.modules.values():
            original = module.weight
            del module.weight
            module.register_parameter("weight_original", original)
            module.register_buffer("weight_mask", torch.ones_like(original))
            module.register_forward_pre_hook(lambda m, _: setattr(m, "weight", m.weight_original * m.weight_mask))
            self._compute(module, initial)

    def _compute(self, module: nn.Module, sparsity: float) -> None:
        with torch.no_grad():
            original = module.weight_original.abs()
            flat = original.flatten()
            k = int(sparsity * flat.shape[-1])
            threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
            module.weight_mask = (original > threshold).to(original.dtype)
            module.weight = module.weight_original * module.weight_mask

    def schedule(self) -> float:
        t0, t1 = self.policy
        base = min(max((1 - (self.global_step - t0) / (t1 - t0)) ** 3, 0.0), 1.0)
        return 1 - base

    def step(self) -> bool:
        """After an optimizer update; True when the masks were recomputed."""
        begin, end = self.window
        pruning = (self.global_step >= begin and (end == -1 or self.global_step <= end)
                   and (self.global_step - begin) % self.frequency == 0)
        if pruning:
            sparsity = self.initial + (self.target - self.initial) * self.schedule()
            for module in self.modules.values():
                self._compute(module, sparsity)
        self.global_step += 1
        return pruning

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: m.weight_mask.bool().clone() for n, m in self.modules.items()}

    def stored(self) -> dict[str, torch.Tensor]:
        return {n: m.weight_original.detach().clone() for n, m in self.modules.items()}


def _distill_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1),
                    reduction="batchmean") * temperature ** 2


def pretraining_kd_loss(student_mlm: torch.Tensor, student_nsp: torch.Tensor, teacher_mlm: torch.Tensor,
                        teacher_nsp: torch.Tensor, labels: torch.Tensor, next_sentence_label: torch.Tensor,
                        attention_mask: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """student_alpha * BertForPreTraining's loss + ce_alpha * sum over [MLM, NSP] of weight [1, 1] * KL."""
    vocab = student_mlm.shape[-1]
    hard = (F.cross_entropy(student_mlm.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
            + F.cross_entropy(student_nsp.reshape(-1, 2), next_sentence_label.reshape(-1)))
    keep = attention_mask.unsqueeze(-1).bool()  # HFTeacherWrapper._masked_outputs: non-padding tokens
    s_mlm = torch.masked_select(student_mlm, keep).view(-1, vocab)
    t_mlm = torch.masked_select(teacher_mlm, keep).view(-1, vocab)
    kd = 1 * _distill_ce(s_mlm, t_mlm, temperature) + 1 * _distill_ce(student_nsp, teacher_nsp, temperature)
    return 0.5 * hard + 0.5 * kd
