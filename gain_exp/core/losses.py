"""GAIN's losses: classification L_cl, attention mining L_am (Eq. 5), extra supervision L_e (Eq. 7).

L_e takes one of five forms (``ex_loss``), all supervised by the pixel masks H of the annotated images: GAIN_ext's
MSE (Eq. 7) and four peer guidance losses, three on GAIN's attention map (GRADIA, HAICS, energy) and one on input
gradients (RRR). docs/methods.md, "Peer guidance losses", gives their sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from gain_exp.core.gain import GAINOutput
from gain_exp.data.base import IGNORE_INDEX

AM_SCORES = ("softmax", "sigmoid", "logit")
EX_ON = ("attention", "mask")
EX_LOSSES = ("mse", "gradia", "haics", "energy", "rrr")  # MAP_LOSSES' names plus rrr (input gradients, no map)
RRR_NORM_STATS = ("through", "held")  # RRR's input gradient: through the batch-norm batch statistics, or them held
LOSS_NAMES = ("loss", "loss_cl", "loss_am", "loss_e")  # loss_e: L_e in the form ex_loss names
EPS = 1e-6  # HAICS: attention clamped to [EPS, 1] before the log; energy: smallest denominator

# Under several processes: count -> (count summed over processes) / world size. A mean over a varying number of
# rows (images kept by L_am, maps with masks for L_e) divides by it, so that DDP's gradient average equals the
# mean over all rows of the global batch, as one process would compute it (runtime.Runtime.mean_count).
CountReducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LossTerms:
    """The weighted total and its unweighted parts (a part that is off for this epoch is zero)."""

    total: torch.Tensor
    cl: torch.Tensor
    am: torch.Tensor
    ex: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """The four values, detached, in LOSS_NAMES order (no host sync)."""
        return torch.stack([self.total, self.cl, self.am, self.ex]).detach().float()

    def as_dict(self) -> dict[str, float]:
        return dict(zip(LOSS_NAMES, self.stacked().tolist()))


@dataclass(frozen=True)
class StepNeeds:
    """What a training step must give GAINLoss in one epoch (``GAINLoss.step_needs``), besides the batch."""

    mining: bool  # the attention-mining stream (L_am is on)
    maps: bool  # attention maps for L_e (a map form of L_e is on): only a batch with masks needs them
    input_gradients: bool  # images with requires_grad before the forward: L_e differentiates the logits (RRR)
    held_norm_stats: bool  # those input gradients from the annotated images run again, batch norm held (StepInputs)

    def attention(self, has_masks: bool) -> bool:
        """Whether the step runs the attention stream, for a batch with (``has_masks``) or without annotated images."""
        return self.mining or (self.maps and has_masks)


class StepInputs:
    """One training step's inputs as GAINLoss needs them (``GAINLoss.step_inputs``).

    Run the model's forward on ``images`` inside ``with step:``, then pass ``**step.loss_inputs()`` to the loss. RRR
    (input gradients, trained through by double backprop): ``images`` have requires_grad set, and the loss
    differentiates this forward's logits (``rrr_norm_stats=through``); or, with the statistics ``held``, the
    forward records each batch-norm layer's batch statistics and the annotated images run again with them
    (RightReasonsInputs). Any other loss: the images as given, nothing else for the loss.
    """

    def __init__(
        self, model: nn.Module, images: torch.Tensor, use_mask: torch.Tensor, needs: StepNeeds, has_masks: bool = True
    ) -> None:
        through = needs.input_gradients and not needs.held_norm_stats
        self.images = images.detach().requires_grad_(True) if through else images
        self.use_mask, self.has_masks = use_mask, has_masks
        self._inputs = self.images if through else None
        self.recorder = RightReasonsInputs(model) if needs.input_gradients and needs.held_norm_stats else None

    def __enter__(self) -> StepInputs:
        if self.recorder is not None:
            self.recorder.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(*exc)

    def loss_inputs(self) -> dict[str, Any]:
        """GAINLoss.forward's ``images`` and ``input_logits`` for this step (after the forward)."""
        if self.recorder is not None and self.has_masks:
            input_logits, inputs = self.recorder(self.images, self.use_mask)
            return {"images": inputs, "input_logits": input_logits}
        return {"images": self._inputs, "input_logits": None}


class GAINLoss(nn.Module):
    """L = cl_weight * L_cl + am_weight * L_am + ex_weight * L_e, each part switched on from its start epoch.

    Args:
        multi_label: BCE-with-logits (multi-label) or cross-entropy (single-label) for L_cl.
        cl_weight: weight of L_cl (the seed's ``--cl_loss_factor``; 0 trains on L_am / L_e alone).
        am_weight: alpha of Eq. 6 (0 turns attention mining off).
        ex_weight: omega_e of Eq. 8 (0 turns extra supervision off).
        am_score: score of I* that L_am pushes down: ``softmax`` (seed), ``sigmoid`` or raw ``logit``.
        am_start_epoch, ex_start_epoch: epochs of plain classification before each part starts.
        am_on_all: binary data with a negative class: mine attention on every image (True) or on
            positives only (False).
        negative_class: index of the negative class, used when ``am_on_all`` is False.
        ex_on: L_e compares the ``attention`` map A (Eq. 7) or the soft ``mask`` T(A) with the pixel mask.
        ex_loss: the form of L_e: ``mse`` (GAIN_ext, Eq. 7), ``gradia``, ``haics`` or ``energy`` (on the map
            ``ex_on`` names, see MAP_LOSSES), or ``rrr`` (Right for the Right Reasons: input gradients of the
            log-probabilities outside the mask, see ``right_reasons``; needs ``images`` in ``forward``).
        rrr_norm_stats: RRR with batch norm in training mode: the input gradient of the training forward, which
            flows ``through`` the batch's mean and variance (Ross et al.'s formula taken literally), or the annotated
            images run again with those statistics ``held`` constant (see RightReasonsInputs).
    """

    def __init__(
        self,
        multi_label: bool,
        am_weight: float = 1.0,
        ex_weight: float = 10.0,
        am_score: str = "softmax",
        am_start_epoch: int = 0,
        ex_start_epoch: int = 0,
        am_on_all: bool = True,
        negative_class: int | None = None,
        ex_on: str = "attention",
        cl_weight: float = 1.0,
        ex_loss: str = "mse",
        rrr_norm_stats: str = "through",
    ) -> None:
        super().__init__()
        check_options(
            am_weight,
            ex_weight,
            am_score,
            ex_on,
            am_start_epoch,
            ex_start_epoch,
            cl_weight=cl_weight,
            ex_loss=ex_loss,
            rrr_norm_stats=rrr_norm_stats,
        )
        self.cl_weight = float(cl_weight)
        self.multi_label = multi_label
        self.am_weight = float(am_weight)
        self.ex_weight = float(ex_weight)
        self.am_score = am_score
        self.am_start_epoch = am_start_epoch
        self.ex_start_epoch = ex_start_epoch
        self.am_on_all = am_on_all
        self.negative_class = negative_class
        self.ex_on = ex_on
        self.ex_loss = ex_loss
        self.rrr_norm_stats = rrr_norm_stats

    def active(self, epoch: int) -> tuple[bool, bool]:
        """Whether (L_am, L_e) are on in this epoch: decides which GAIN streams the step must run."""
        return (
            self.am_weight > 0 and epoch >= self.am_start_epoch,
            self.ex_weight > 0 and epoch >= self.ex_start_epoch,
        )

    def input_gradients(self, epoch: int) -> bool:
        """Whether this epoch's step must pass ``images`` with requires_grad (RRR's L_e), instead of attention."""
        return self.ex_loss == "rrr" and self.active(epoch)[1]

    def step_needs(self, epoch: int) -> StepNeeds:
        """What this epoch's training step must give the loss: which GAIN streams to run, and input gradients."""
        am_on, ex_on = self.active(epoch)
        input_grad = self.input_gradients(epoch)
        return StepNeeds(
            mining=am_on,
            maps=ex_on and not input_grad,
            input_gradients=input_grad,
            held_norm_stats=input_grad and self.rrr_norm_stats == "held",
        )

    def prepare(self, model: nn.Module, epoch: int) -> None:
        """Set ``model`` up for this epoch's training steps, before the first.

        Input gradients (RRR): the double backward runs through every layer, and fused attention kernels (timm's
        ViT, Swin: ``fused_attn``) have none, so those modules switch to the unfused path, for good (evaluation then
        runs the path training does).
        """
        if self.input_gradients(epoch):
            for module in model.modules():
                if getattr(module, "fused_attn", False):
                    module.fused_attn = False

    def step_inputs(
        self, model: nn.Module, images: torch.Tensor, use_mask: torch.Tensor, epoch: int, has_masks: bool = True
    ) -> StepInputs:
        """This epoch's step inputs for one batch (see StepInputs); ``has_masks``: any image of the batch annotated
        (under several processes always True: every process runs what the loss's collectives need)."""
        return StepInputs(model, images, use_mask, self.step_needs(epoch), has_masks)

    def forward(
        self,
        out: GAINOutput,
        targets: torch.Tensor,
        seg: torch.Tensor | None = None,
        use_mask: torch.Tensor | None = None,
        epoch: int = 0,
        count: CountReducer | None = None,
        images: torch.Tensor | None = None,
        input_logits: torch.Tensor | None = None,
    ) -> LossTerms:
        """Weighted GAIN loss for one batch; ``seg``/``use_mask`` are the dataset's label maps and mask flags.

        ``count``: set when this batch is one process's share of a global batch (see CountReducer).
        RRR only: ``images`` with requires_grad set before the forward that gave the logits it differentiates:
        either the batch ``out`` was computed from (``input_logits`` None), or, as ``RightReasonsInputs`` gives
        them (what the trainer does), the annotated rows of the batch and ``input_logits`` their logits.
        """
        cl = self.classification(out.logits, targets, count)
        am_on, ex_on = self.active(epoch)
        zero = cl.new_zeros(())
        am = self.attention_mining(out, targets, count) if am_on and out.am_logits is not None else zero
        ex = zero
        if ex_on and self.ex_loss == "rrr" and seg is not None and use_mask is not None:
            if (count is not None or use_mask.any()) and (images is None or not images.requires_grad):
                raise ValueError(
                    "loss.ex_loss=rrr differentiates the log-probabilities w.r.t. the images; call "
                    "images.requires_grad_() before the model's forward and pass images= to the loss."
                )
            if images is None:  # no annotated image in this batch: no penalty
                ex = zero
            elif input_logits is None:
                ex = self.right_reasons(out.logits, images, targets, seg, use_mask, count)
            else:
                rows = use_mask.to(torch.bool)
                ex = self.right_reasons(input_logits, images, targets[rows], seg[rows], rows[rows], count)
        elif ex_on and out.attention is not None and seg is not None and use_mask is not None:
            ex = self.extra_supervision(out, seg, use_mask, count)
        total = (cl if self.cl_weight == 1.0 else self.cl_weight * cl) + self.am_weight * am + self.ex_weight * ex
        return LossTerms(total=total, cl=cl, am=am, ex=ex)

    def classification(
        self, logits: torch.Tensor, targets: torch.Tensor, count: CountReducer | None = None
    ) -> torch.Tensor:
        """L_cl: BCE-with-logits averaged over classes (multi-label) or cross-entropy (single-label)."""
        if count is not None:
            if self.multi_label:
                per_image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
            else:
                per_image = F.cross_entropy(logits, targets.argmax(dim=1), reduction="none")
            return _global_mean(per_image, count)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets.argmax(dim=1))

    def attention_mining(
        self, out: GAINOutput, targets: torch.Tensor, count: CountReducer | None = None
    ) -> torch.Tensor:
        """L_am (Eq. 5): per image, the mean over its target labels of I*'s score, averaged over images."""
        logits = out.am_logits
        if self.am_score == "softmax":
            scores = logits.softmax(dim=1)
        elif self.am_score == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits
        per_map = (scores * out.map_targets).sum(dim=1)
        per_image = torch.zeros(targets.shape[0], dtype=per_map.dtype, device=per_map.device)
        per_image = per_image.index_add(0, out.image_index, per_map)
        n_labels = targets.sum(dim=1)
        keep = n_labels > 0
        if not self.am_on_all and self.negative_class is not None:
            keep &= targets[:, self.negative_class] < 0.5
        if count is not None:
            return _global_mean(per_image[keep] / n_labels[keep], count)
        if not keep.any():
            return per_map.sum() * 0.0
        return (per_image[keep] / n_labels[keep]).mean()

    def extra_supervision(
        self, out: GAINOutput, seg: torch.Tensor, use_mask: torch.Tensor, count: CountReducer | None = None
    ) -> torch.Tensor:
        """L_e on the maps whose image has a mask: the mean over maps of ``MAP_LOSSES[ex_loss]`` (mse: Eq. 7).

        HAICS and energy leave out maps whose mask is empty (nothing to point at: constant loss, no gradient).
        """
        rows = use_mask.to(torch.bool)[out.image_index]
        if count is None and not rows.any():
            return out.attention.sum() * 0.0
        truth, valid = map_masks(out, seg, rows)
        pred = (out.attention if self.ex_on == "attention" else out.mask)[rows]
        per_map, kept = MAP_LOSSES[self.ex_loss](pred, truth, valid)
        if kept is not None:
            per_map = per_map[kept]
            if count is None and not kept.any():
                return pred.sum() * 0.0
        return per_map.mean() if count is None else _global_mean(per_map, count)

    def right_reasons(
        self,
        logits: torch.Tensor,
        images: torch.Tensor,
        targets: torch.Tensor,
        seg: torch.Tensor,
        use_mask: torch.Tensor,
        count: CountReducer | None = None,
    ) -> torch.Tensor:
        """RRR (Ross et al., IJCAI 2017, Eq. 1): per annotated image, sum_{c,i,j} ((1 - H_ij) dS/dx_cij)^2.

        S = sum over the batch and the K classes of log p_k (log-softmax; log-sigmoid per class if multi-label),
        differentiated w.r.t. the (normalised) input with create_graph, so the penalty trains through the input
        gradient (double backprop). Channels are summed, pixels summed (not averaged, as in dtak/rrr), then the
        penalty is averaged over the annotated images. H is the union of the image's target classes' pixels;
        ignore pixels carry no penalty; an image whose mask is empty has its whole input gradient penalised.
        """
        rows = use_mask.to(torch.bool)
        if count is None and not rows.any():
            return logits.sum() * 0.0
        log_p = F.logsigmoid(logits.float()) if self.multi_label else F.log_softmax(logits.float(), dim=1)
        (grads,) = torch.autograd.grad(log_p.sum(), images, create_graph=True)
        index = rows.nonzero().squeeze(1)
        truth, valid = class_masks(seg, index, targets[index].to(grads.dtype))
        outside = (1 - truth) * valid
        per_image = (outside.unsqueeze(1) * grads[index]).square().flatten(1).sum(1)
        return per_image.mean() if count is None else _global_mean(per_image, count)


class RightReasonsInputs:
    """RRR's own forward of the annotated images, each batch-norm layer's batch statistics held constant
    (``loss.rrr_norm_stats=held``).

    Wrap the training forward in ``with inputs:`` (it records every batch-norm layer's batch mean and variance),
    then ``inputs(images, use_mask)`` gives (logits, images) of the annotated rows, images with requires_grad set,
    normalised with those statistics as constants: the training forward's function of one image. The training
    forward's own input gradient also flows through the batch's mean and variance, where other images' terms can
    cancel an image's gradient (docs/results/methods-table.md, RRR). Only the annotated rows run again.
    Under SyncBatchNorm the statistics held are this process's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RightReasonsInputs:
        self.stats = {}
        self._handles = [
            m.register_forward_hook(self._record)
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if module not in self.stats:  # the first call: the classification stream
            x = inputs[0].detach().float()
            var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
            self.stats[module] = (mean, var)

    def __call__(self, images: torch.Tensor, use_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = use_mask.to(device=images.device, dtype=torch.bool)
        inputs = images.detach()[rows].requires_grad_(True)
        saved = {m: (m.running_mean, m.running_var) for m in self.stats}
        try:
            for m, (mean, var) in self.stats.items():
                m.running_mean, m.running_var = mean, var
                m.eval()
            return self.model(inputs), inputs
        finally:
            for m, (mean, var) in saved.items():
                m.running_mean, m.running_var = mean, var
                m.train()


# Per-map forms of L_e: (pred, truth, valid), each N x H x W -> (loss per map, maps kept or None for all). Means
# run over the valid pixels (ignore pixels are left out). Sources: docs/methods.md, "Peer guidance losses".
MapLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def mse_map_loss(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, None]:
    """GAIN_ext's L_e (Eq. 7): mean over pixels of (A - H)^2."""
    err = (pred - truth) ** 2 * valid
    return err.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1), None


def gradia_map_loss(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, None]:
    """GRADIA (Gao et al., RES, KDD 2022; Model-Guidance's L1): mean over pixels of |A - H|."""
    err = (pred.float() - truth.float()).abs() * valid
    return err.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1), None


def haics_map_loss(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HAICS as Model-Guidance's PPCE (Rao et al., ICCV 2023, losses.py): BCE(A[H == 1], 1), mean over H's pixels.

    BCE against 1 is -log A; A is clamped to [EPS, 1] (torch's BCE needs A <= 1 and refuses bf16 autocast).
    """
    inside = (truth > 0.5) & valid
    nll = -pred.float().clamp(EPS, 1.0).log() * inside
    size = inside.flatten(1).sum(1)
    return nll.flatten(1).sum(1) / size.clamp(min=1), size > 0


def energy_map_loss(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy loss (Rao et al., ICCV 2023, Model-Guidance losses.py): 1 - sum(A+ H) / sum(A+), A+ = ReLU(A).

    A map with no positive attention scores 1 (the denominator is at least EPS), as in Model-Guidance.
    """
    positive = pred.float().clamp(min=0) * valid
    inside = truth.float() * valid
    share = (positive * inside).flatten(1).sum(1) / positive.flatten(1).sum(1).clamp(min=EPS)
    return 1 - share, inside.flatten(1).sum(1) > 0


MAP_LOSSES: dict[str, MapLoss] = {
    "mse": mse_map_loss,
    "gradia": gradia_map_loss,
    "haics": haics_map_loss,
    "energy": energy_map_loss,
}


def _global_mean(values: torch.Tensor, count: CountReducer) -> torch.Tensor:
    """This process's share of the mean over every process's ``values`` (0 when no process has any)."""
    share = count(values.new_tensor(float(len(values))))
    return values.sum() / torch.where(share > 0, share, torch.ones_like(share))


def check_options(
    am_weight: float,
    ex_weight: float,
    am_score: str,
    ex_on: str,
    am_start_epoch: int,
    ex_start_epoch: int,
    prefix: str = "",
    cl_weight: float = 1.0,
    ex_loss: str = "mse",
    rrr_norm_stats: str = "through",
) -> None:
    """Raise ValueError with one sentence for the first invalid loss option (``prefix`` names its config node)."""
    for name, value in (("cl_weight", cl_weight), ("am_weight", am_weight), ("ex_weight", ex_weight)):
        if value < 0:
            raise ValueError(
                f"{prefix}{name}={value} is negative; loss weights must be >= 0 (0 switches the term off)."
            )
    for name, value in (("am_start_epoch", am_start_epoch), ("ex_start_epoch", ex_start_epoch)):
        if value < 0:
            raise ValueError(f"{prefix}{name}={value} is negative; use 0 to start that loss term in the first epoch.")
    if am_score not in AM_SCORES:
        raise ValueError(f"{prefix}am_score='{am_score}' is unknown; choose one of {list(AM_SCORES)}.")
    if ex_on not in EX_ON:
        raise ValueError(f"{prefix}ex_on='{ex_on}' is unknown; choose one of {list(EX_ON)}.")
    if ex_loss not in EX_LOSSES:
        raise ValueError(
            f"{prefix}ex_loss='{ex_loss}' is unknown; choose one of {list(EX_LOSSES)} (mse is GAIN_ext's "
            f"L_e, the others peer guidance losses, each with its own conf/loss/<name>.yaml)."
        )
    if rrr_norm_stats not in RRR_NORM_STATS:
        raise ValueError(f"{prefix}rrr_norm_stats='{rrr_norm_stats}' is unknown; choose one of {list(RRR_NORM_STATS)}.")


def map_masks(
    out: GAINOutput, seg: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for each map: the pixels of the classes it explains (per_label: its class; batch: the union).

    Returns (truth, valid), both N x H x W (``rows`` selects maps); valid is False on ignore pixels.
    """
    index, targets = out.image_index, out.map_targets
    if rows is not None:
        index, targets = index[rows], targets[rows]
    return class_masks(seg, index, targets)


def class_masks(seg: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(truth, valid), N x H x W: truth marks the pixels of row n's classes ``targets[n]`` in image ``index[n]``."""
    labels = seg[index].long()
    valid = labels != IGNORE_INDEX
    # lookup table per map: label value v -> 1 if class v-1 is one the map explains (0 = background)
    lut = F.pad(targets, (1, 0))
    truth = lut.gather(1, labels.where(valid, 0).flatten(1).clamp(max=lut.shape[1] - 1)).view_as(labels)
    return truth, valid
