"""AFT: Adversarial Feature Translation for multi-domain recommendation.

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao, Liu, Xie, Ge, Tang,
Zhang and Lin, KDD 2021). The generator G (:mod:`.generator`, Eqs. 1-5) proposes items of the
target domain as fake clicks (by default k draws from its softmax at temperature
``g_temperature``; its top-k as printed, ``fake_sampling=topk``); the discriminator D
(:mod:`.discriminator`, Eqs. 6-12) learns to tell real clicks from unclicked and fake ones,
and its user vector u_t is what the model serves. The losses of section 3.4 live here:

* Eq. 13, ``L_D``: binary cross-entropy over the positives (label 1), the sampled unclicked
  items of the target domain and G's fakes (label 0);
* Eq. 14, ``L_G``: REINFORCE on G's fakes with the reward ``Q = p_d`` (no gradient into D);
  by default on the log-probability of the policy that drew them (``reinforce``);
* Eq. 15, ``L_MMD``: by default (``mmd_form=cross``) minus the cross term of the Gaussian-kernel
  MMD between the fake and the real clicked items of each (user, target domain), so
  minimising it pushes the fakes away from the clicks; ``mmd_form=full``: minus the whole
  MMD^2, as printed;
* Eq. 16, ``L = lambda_D L_D + lambda_G L_G + lambda_M L_MMD``.

The alternating optimisation (two Adam optimisers, warm-up, D:G ratio) is
:class:`aftrec.training.adversarial.AdversarialStep`, which the training package gives every
model that declares ``training_step = "adversarial"``.

Registered variants (section 5.2): ``aft`` (D+G), ``aft-paper`` (D+G with G trained as
section 3 prints it), ``aft-d`` (D with random unclicked negatives only) and ``aft-hnm`` (D
with hard negatives mined from its own ranking, after "Embedding-based Retrieval in Facebook
Search", Huang et al., KDD 2020). Table 6 ablations are config switches:
``negatives=random`` (no generator), ``mask_ratio=0`` (no domain-specific mask),
``translation=attention`` (no feature translation), ``lambda_m=0`` (no dissimilarity loss).
Every choice the paper leaves open is in docs/aft.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from aftrec.config import Bound, Checked, Count, Positive, Rate, Weight
from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.loader import Batch
from aftrec.errors import ConfigError
from aftrec.models.aft.discriminator import Discriminator
from aftrec.models.aft.generator import Generator, target_rows
from aftrec.models.aft.health import FakeHealth
from aftrec.models.aft.topk import Exclusions, domain_logsumexp, domain_top_k
from aftrec.models.base import Channel, RetrievalModel, target_column
from aftrec.registry import DROPOUT, Range, register_model

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {
    "dim": "16",
    "g_hidden": "32",
    "g_layers": "1",
    "g_heads": "2",
    "d_heads": "2",
    "conve_rows": "4",
    "conve_channels": "4",
}


Translation = Literal["conve", "attention"]
Negatives = Literal["generator", "random", "hard"]
Reinforce = Literal["log", "softmax", "paper"]
MMDForm = Literal["full", "cross"]
FakeSampling = Literal["topk", "sample"]
Steps = Annotated[int, Bound(low=0)]


@dataclass(frozen=True)
class AFTConfig(Checked):
    # --- architecture (section 5.3) ---
    dim: Count = 64  # item and domain embeddings
    g_layers: Count = 4  # generator Transformer (Eq. 3): 4 layers, 8 heads
    g_heads: Count = 8
    d_layers: Count = 1  # discriminator Transformers (Eq. 7): 1 layer, 16 heads
    d_heads: Count = 16
    ff_mult: Count = 4  # Transformer feed-forward width = ff_mult * dim
    g_hidden: Count = 256  # hidden width of G's two-layer MLP (Eq. 4)
    dropout: Rate = 0.1
    translation: Translation = "conve"  # "conve" (Eqs. 10-11) or "attention" (Table 6 ablation)
    conve_channels: Count = 16  # 2-D filters per ConvE
    conve_kernel: Count = 3
    conve_rows: Count = 8  # Eq. 11: u_g and the relation as conve_rows x (dim / conve_rows)
    # --- negatives: "generator" = AFT (D+G), "random" = AFT (D), "hard" = AFT (D+HNM) ---
    negatives: Negatives = "generator"
    mask_ratio: Rate = 0.15  # Eq. 1, Fig. 3 (a)
    n_fakes: Count = 5  # top-k fake clicks per positive (Fig. 3 (b)); hard negatives for "hard"
    # --- losses (Eq. 16) ---
    lambda_d: Weight = 1.0
    lambda_g: Weight = 1.0
    lambda_m: Weight = 0.1  # 0 = Table 6 "- dissimilarity loss"; the paper: 1 (aft-paper)
    reinforce: Reinforce = "softmax"  # log pi; "log": log p_g (aft-paper); "paper": p_g Q
    mmd_sigma: Positive = 1.0  # Gaussian kernel bandwidth of Eq. 15
    mmd_form: MMDForm = "cross"  # "cross": cross term only; "full": -MMD^2 (aft-paper)
    # --- how G proposes and how its fakes enter L_D (docs/aft.md, "Repairing G") ---
    fake_sampling: FakeSampling = "sample"  # "sample": softmax draws; "topk": G's top-k (aft-paper)
    g_temperature: Positive = 4.0  # tau of softmax(h_t . e / tau) when sampling / "softmax";
    # 4 chosen on validation of both presets (docs/aft.md, "G's temperature"); aft-paper: 1
    g_supervised: Weight = 1.0  # weight of G's BCE on the real click beside REINFORCE (anchor)
    fake_weight: Weight = 1.0  # weight of each fake in L_D (Eq. 13), 1 = a full negative
    fake_drop_above_pos: bool = False  # a fake D scores above the row's positive: weight 0
    # --- schedule (AdversarialStep) ---
    d_every: Count = 1  # D is updated on every d_every-th batch
    g_every: Count = 1  # G is updated on every g_every-th batch
    warmup_steps: Steps = 0  # first batches: D on random negatives, G supervised, no GAN terms
    d_lr: Positive | None = None  # None: train.lr
    g_lr: Positive | None = None
    # --- hard negative mining (negatives="hard") as fractions of the domain's size ---
    hnm_skip: Rate = 0.01  # skip the top ceil(hnm_skip * n_d) ranks (likely positives)
    hnm_band: Positive = 0.05  # then sample uniformly from the next ceil(hnm_band * n_d)
    # --- G's top-k and D's ranking are scored this many items at a time (bounded memory) ---
    topk_chunk: Count = 65_536

    #: keys added after runs were saved, with the values those runs computed with (G as
    #: section 3 prints it): a saved config without them is compared as if it had these
    LEGACY_VALUES: ClassVar[dict[str, object]] = {
        "mmd_form": "full", "fake_sampling": "topk", "g_temperature": 1.0, "g_supervised": 0.0,
        "fake_weight": 1.0, "fake_drop_above_pos": False,
    }  # fmt: skip

    def validate(self) -> None:
        for key in ("g_heads", "d_heads", "conve_rows"):
            if self.dim % getattr(self, key):
                raise ConfigError(
                    f"config key model.{key}={getattr(self, key)} must divide model.dim={self.dim}"
                )
        if self.conve_kernel % 2 == 0:
            raise ConfigError(f"model.conve_kernel must be odd, got {self.conve_kernel}")
        # the two ConvE images are (2 n_domains) x dim (Eq. 10) and (2 conve_rows) x
        # (dim / conve_rows) (Eq. 11): from any pixel a filter of 2 * side - 1 reaches every
        # other one, and its further taps would see only padding (with at most dim / 2 domains)
        widest = 2 * max(self.dim, 2 * self.conve_rows) - 1
        if self.conve_kernel > widest:
            raise ConfigError(
                f"model.conve_kernel={self.conve_kernel} is wider than ConvE's images need: "
                f"at most {widest} for model.dim={self.dim} (taps beyond it see only zero "
                "padding)"
            )
        if self.hnm_band > 1:
            raise ConfigError("model.hnm_skip must be in [0, 1) and model.hnm_band in (0, 1]")


@dataclass(frozen=True)
class AFTPaperConfig(AFTConfig):
    """G trained as section 3 prints it: the deterministic top-k fakes of Eq. 5, REINFORCE on
    ``log sigmoid(h_t . e)`` (Eq. 14 as a policy gradient), ``-MMD^2`` with the gradient
    through the fakes' weights (Eq. 15, lambda_M = 1), no supervised anchor, fakes as full
    negatives in L_D. This collapses onto a few popular items (docs/aft.md)."""

    fake_sampling: FakeSampling = "topk"
    reinforce: Reinforce = "log"
    mmd_form: MMDForm = "full"
    lambda_m: Weight = 1.0
    g_supervised: Weight = 0.0
    g_temperature: Positive = 1.0
    fake_weight: Weight = 1.0
    fake_drop_above_pos: bool = False
    warmup_steps: Annotated[int, Bound(low=0)] = 0


#: keys that only G reads: they cannot change what a model without a generator computes
G_KEYS = (
    "g_layers", "g_heads", "g_hidden", "mask_ratio", "lambda_g", "lambda_m", "reinforce",
    "mmd_sigma", "mmd_form", "fake_sampling", "g_temperature", "g_supervised", "g_every", "g_lr",
)  # fmt: skip


@dataclass(frozen=True)
class AFTDConfig(AFTConfig):
    negatives: Negatives = "random"
    #: no generator and no extra negatives: G's keys and the fakes' keys are inert
    INERT_KEYS: ClassVar[tuple[str, ...]] = (
        *G_KEYS, "n_fakes", "fake_weight", "fake_drop_above_pos", "hnm_skip", "hnm_band",
        "topk_chunk", "warmup_steps",
    )  # fmt: skip


@dataclass(frozen=True)
class AFTHNMConfig(AFTConfig):
    negatives: Negatives = "hard"
    INERT_KEYS: ClassVar[tuple[str, ...]] = G_KEYS  # no generator


class ClickIndex:
    """Every user's training clicks as a CSR (indptr over users, global item ids)."""

    def __init__(self, train: Interactions, n_users: int) -> None:
        users = train.user.astype(np.int64)
        order = np.argsort(users, kind="stable")
        self.indptr = torch.from_numpy(np.r_[0, np.cumsum(np.bincount(users, minlength=n_users))])
        self.items = torch.from_numpy(train.item[order].astype(np.int64))

    def pairs(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in batch, global item id) of every training click of ``users`` (B,)."""
        users = users.cpu()
        lo, hi = self.indptr[users], self.indptr[users + 1]
        n = hi - lo  # (B,)
        rows = torch.repeat_interleave(torch.arange(len(users)), n)
        start = torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n)
        return rows, self.items[start + torch.arange(int(n.sum()))]


def bce_sum(logits: torch.Tensor, label: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed binary cross-entropy of ``logits`` against a constant ``label``."""
    target = torch.full_like(logits, label)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")


def reinforce_loss(
    g_logits: torch.Tensor,
    reward: torch.Tensor,
    valid: torch.Tensor,
    form: str,
    log_norm: torch.Tensor | None = None,
    tau: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14 over the fakes: (B, k) G logits ``h_t . e``, detached rewards Q = p_d and
    validity. Returns the loss and the (B, k) multiplier of the log-probability (what G's
    gradient is scaled by: ``Q - b``, or ``Q`` for the printed form).

    ``"paper"``: ``-1/N_g sum p_g Q`` as printed. ``"log"``: the REINFORCE estimator
    ``-1/N_g sum log p_g (Q - b)`` with ``p_g = sigmoid(h_t . e)`` (Eq. 5) and ``b`` the mean
    reward of the user's fakes (of the batch's fakes when k = 1): the usual variance-reduced
    policy gradient (Williams 1992; IRGAN, Wang et al. SIGIR 2017). ``"softmax"``: the same
    with the policy that actually drew the fakes when they are sampled,
    ``log pi(e|u) = h_t . e / tau - log_norm`` (``log_norm`` the (B,) log-sum-exp of
    ``h_t . e' / tau`` over the allowed items of the domain). See docs/aft.md."""
    v = valid.to(g_logits.dtype)
    n = v.sum().clamp(min=1.0)
    if form == "paper":
        return -(torch.sigmoid(g_logits) * reward * v).sum() / n, reward
    if reward.shape[1] > 1:
        base = (reward * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1.0)
    else:
        base = (reward * v).sum() / n
    advantage = reward - base  # (B, k)
    if form == "softmax":
        assert log_norm is not None, "the softmax policy needs its normaliser"
        log_p = g_logits / tau - log_norm[:, None]
    else:
        log_p = F.logsigmoid(g_logits)
    return -(log_p * advantage * v).sum() / n, advantage


def gaussian_mmd2(
    x: torch.Tensor,
    wx: torch.Tensor,
    y: torch.Tensor,
    wy: torch.Tensor,
    sigma: float,
    cross_only: bool = False,
) -> torch.Tensor:
    """Squared MMD (biased V-statistic) with a Gaussian kernel, per row of the batch.

    ``x`` (B, m, d) with weights ``wx`` (B, m) and ``y`` (B, n, d) with ``wy`` (B, n), each
    weight row summing to 1 (zero weights for absent points). Returns (B,)::

        MMD^2 = sum_ij wx_i wx_j k(x_i, x_j) + sum_ij wy_i wy_j k(y_i, y_j)
                - 2 sum_ij wx_i wy_j k(x_i, y_j),   k(a, b) = exp(-|a - b|^2 / (2 sigma^2))

    ``cross_only`` returns ``-2 sum_ij wx_i wy_j k(x_i, y_j)`` alone: the only part of MMD^2
    that depends on how near the fakes are to the real clicks (the ``k(x, x)`` term is
    largest when the fakes cluster, so maximising it rewards collapse).
    """

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(1) - 2 * a @ b.mT
        return torch.exp(-sq.clamp(min=0.0) / (2 * sigma**2))  # (B, |a|, |b|)

    def quad(w1: torch.Tensor, k: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,bij,bj->b", w1, k, w2)

    cross = -2 * quad(wx, kernel(x, y), wy)
    if cross_only:
        return cross
    return quad(wx, kernel(x, x), wx) + quad(wy, kernel(y, y), wy) + cross


#: ``aftrec tune``: G's temperature and the dissimilarity weight, beside the dropout (every AFT
#: row) and the hard negatives' band (D+HNM); aft-d has no generator, aft-paper samples no
#: softmax (its temperature is inert)
LAMBDA_M = {"model.lambda_m": Range(0.01, 1.0, log=True)}
TUNE_AFT = {**DROPOUT, "model.g_temperature": Range(1.0, 16.0, log=True), **LAMBDA_M}
TUNE_HNM = {
    **DROPOUT,
    "model.hnm_skip": Range(0.0, 0.05),
    "model.hnm_band": Range(0.01, 0.2, log=True),
}


@register_model("aft", AFTConfig, paper_name="AFT (D+G)", paper_row=15, quick=QUICK, tune=TUNE_AFT)
class AFT(RetrievalModel):
    """AFT (D+G); serves D's u_t (Eq. 11) against D's item embeddings (Eq. 12)."""

    training_step = "adversarial"  # two optimisers: aftrec.training.adversarial
    offsets: torch.Tensor

    def __init__(self, cfg: AFTConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.cfg: AFTConfig = cfg
        self.discriminator = Discriminator(cfg, info)
        self.generator: Generator | None = None
        if cfg.negatives == "generator":
            self.generator = Generator(cfg, info)
        self.register_buffer("offsets", torch.tensor(info.offsets), persistent=False)
        # D's only negatives without G or mining, and during the warm-up (Eq. 13)
        self.needs_negatives = cfg.negatives == "random" or cfg.warmup_steps > 0
        self.clicks: ClickIndex | None = None
        self.health: FakeHealth | None = None

    # --- serving ----------------------------------------------------------------------------
    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        target = target_column(batch, domain)
        u: torch.Tensor = self.discriminator(batch.history, batch.counts, target)
        return u  # (B, dim)

    def item_vectors(self, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        return self.discriminator.item_emb.weight[lo:hi]

    # --- recommendation-trial channel (section 5.5.3) -----------------------------------------
    @property
    def has_generator(self) -> bool:
        return self.generator is not None

    def serving_channels(self) -> dict[str, Channel]:
        """D's channel, and G's ``"trial"`` channel when this variant has a generator."""
        channels = super().serving_channels()
        if self.generator is not None:
            channels["trial"] = Channel(self.trial_vectors, self.trial_item_vectors)
        return channels

    def trial_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        """G's h_t (Eq. 4): the generator's user vector, for the trial channel."""
        assert self.generator is not None, "this AFT variant has no generator"
        target = target_column(batch, domain)
        h: torch.Tensor = self.generator(batch.history, target)
        return h  # (B, dim)

    def trial_item_vectors(self, domain: int) -> torch.Tensor:
        """G's item embeddings of ``domain`` (Eq. 5)."""
        assert self.generator is not None, "this AFT variant has no generator"
        lo, hi = self.info.domain_range(domain)
        return self.generator.item_emb.weight[lo:hi]  # (n_d, dim)

    # --- training ---------------------------------------------------------------------------
    def prepare_training(self, train: Interactions, valid: Interactions | None = None) -> None:
        """Index the training clicks so that no fake / hard negative is a user's click, and
        start the per-epoch health counters of the fakes (:mod:`.health`)."""
        self.clicks = ClickIndex(train, self.info.n_users)
        if self.cfg.negatives != "random":
            self.health = FakeHealth(self.info, train, valid)

    def epoch_health(self) -> dict[str, Any] | None:
        """The epoch's health of G's fakes (or the mined hard negatives), then reset; None for
        ``aft-d`` or before :meth:`prepare_training`. One ranking pass over the epoch's last
        batch with the current D (in eval mode, so no random numbers are drawn)."""
        if self.health is None or self.health.last is None:
            return None
        last, was = self.health.last, self.training
        self.eval()
        with torch.no_grad():
            u = self.discriminator(last.history, last.counts, last.domain)  # (B, dim)
        self.train(was)
        table = self.discriminator.item_emb.weight
        exclude = self.exclusions(last)
        return self.health.summary(u, table, exclude, self.offsets, self.cfg.topk_chunk)

    def epoch_state(self) -> dict[str, Any] | None:
        return None if self.health is None else self.health.state_dict()

    def load_epoch_state(self, state: dict[str, Any] | None) -> None:
        if self.health is not None and state is not None:
            self.health.load_state_dict(state)

    def exclusions(self, batch: Batch) -> Exclusions:
        """(row, item) pairs that may not be fakes or hard negatives: the user's clicks (all
        training clicks once :meth:`prepare_training` ran; always the batch's history and
        positive). Items outside the target domain are never scored at all."""
        b, dev = len(batch), batch.history.device
        hist = batch.history.flatten(1)  # (B, D * L), padding = n_items: outside every domain
        rows = [torch.arange(b, device=dev).repeat_interleave(hist.shape[1])]
        items = [hist.flatten()]
        if batch.pos is not None:
            rows.append(torch.arange(b, device=dev))
            items.append(batch.pos)
        if self.clicks is not None:
            r, i = self.clicks.pairs(batch.users)
            rows.append(r.to(dev))
            items.append(i.to(dev))
        return Exclusions.of(torch.cat(rows), torch.cat(items), (b, self.info.n_items + 1))

    @torch.no_grad()
    def hard_negatives(
        self, u: torch.Tensor, exclude: Exclusions, domain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Huang et al. (KDD 2020) hard negatives from D's own ranking: skip the top
        ``ceil(hnm_skip n_d)`` allowed items, sample ``n_fakes`` uniformly (with replacement)
        from the next ``ceil(hnm_band n_d)``. (B, k) global ids and validity."""
        cfg, b = self.cfg, u.shape[0]
        size = (self.offsets[domain + 1] - self.offsets[domain]).to(torch.float32)  # (B,)
        skip = torch.ceil(cfg.hnm_skip * size).long()
        band = torch.ceil(cfg.hnm_band * size).long().clamp(min=1)
        depth = int((skip + band).max())
        order, _, allowed = domain_top_k(
            u, self.discriminator.item_emb.weight, domain, self.offsets, exclude, depth,
            cfg.topk_chunk,
        )  # (B, depth) D's ranking of the allowed items  # fmt: skip
        hi = torch.minimum(skip + band, allowed)  # exclusive rank bound
        lo = torch.minimum(skip, (hi - 1).clamp(min=0))
        rank = (
            lo[:, None] + (torch.rand(b, cfg.n_fakes, device=u.device) * (hi - lo)[:, None]).long()
        )
        rank = torch.minimum(rank, (hi - 1).clamp(min=0)[:, None])
        return order.gather(1, rank), (rank < allowed[:, None])

    def losses(
        self,
        batch: Batch,
        train_d: bool = True,
        train_g: bool = True,
        warmup: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Eq. 16 and its parts on a training batch: ``loss`` and ``loss_d`` (Eq. 13), plus
        ``loss_g`` (Eq. 14) and ``loss_mmd`` (Eq. 15) when there is a generator.

        ``train_d`` / ``train_g`` say whether D's / G's gradients are needed; the other network
        then runs without autograd. During ``warmup`` D sees only the random negatives and
        ``loss_g`` is G fitted as a plain recommender (BCE of p_g on the positive and the
        random negatives)."""
        assert batch.pos is not None, "training batches carry items"
        cfg, dis, gen = self.cfg, self.discriminator, self.generator
        neg = batch.neg if batch.neg is not None else batch.pos.new_zeros(len(batch), 0)
        real_items = torch.cat([batch.pos.unsqueeze(1), neg], dim=1)  # (B, 1 + K)
        out: dict[str, torch.Tensor] = {}

        with torch.set_grad_enabled(train_g):
            h = None if gen is None else gen(batch.history, batch.domain)  # (B, dim)  Eq. 4
        with torch.set_grad_enabled(train_d):
            u = dis(batch.history, batch.counts, batch.domain)  # (B, dim)  Eq. 11
            real_d = dis.logits(u, real_items)  # (B, 1 + K)  Eq. 12
            d_sum = bce_sum(real_d[:, 0], 1.0) + bce_sum(real_d[:, 1:], 0.0)
            n_all = torch.tensor(float(real_d.numel()), device=u.device)

        # negatives beyond the random ones: G's top-k fakes or D's own hard negatives
        fakes = valid = fake_d = exclude = None
        if not warmup and gen is not None and h is not None:
            k = min(cfg.n_fakes, self.info.n_items)
            exclude = self.exclusions(batch)
            tau = cfg.g_temperature if cfg.fake_sampling == "sample" else None
            fakes, valid = gen.top_k(
                h.detach(), batch.domain, exclude, k, self.offsets, cfg.topk_chunk, tau
            )  # (B, k): G's top-k, or k draws from softmax(h_t . e / tau) without replacement
        elif not warmup and cfg.negatives == "hard":
            fakes, valid = self.hard_negatives(u.detach(), self.exclusions(batch), batch.domain)
        if fakes is not None and valid is not None:
            with torch.set_grad_enabled(train_d):
                fake_d = dis.logits(u, fakes)  # (B, k)
                w = valid.to(fake_d.dtype) * cfg.fake_weight  # (B, k)
                if cfg.fake_drop_above_pos:  # D already prefers it to the real click
                    w = w * (fake_d.detach() <= real_d[:, :1].detach())
                d_sum = d_sum + bce_sum(fake_d, 0.0, weight=w)
                n_all = n_all + w.sum()
            if gen is None and self.health is not None and self.training:
                q = torch.sigmoid(fake_d.detach())
                self.health.observe(batch, fakes, valid, q, torch.zeros_like(q))
        out["loss_d"] = d_sum / n_all  # Eq. 13
        total = cfg.lambda_d * out["loss_d"]

        if gen is not None and h is not None:
            with torch.set_grad_enabled(train_g):
                if warmup:
                    g_real = gen.logits(h, real_items)  # (B, 1 + K)
                    out["loss_g"] = (
                        bce_sum(g_real[:, 0], 1.0) + bce_sum(g_real[:, 1:], 0.0)
                    ) / g_real.numel()
                else:
                    assert fakes is not None and valid is not None and fake_d is not None
                    assert exclude is not None
                    g_fake = gen.logits(h, fakes)  # (B, k)
                    reward = torch.sigmoid(fake_d.detach())  # Q = p_d, no gradient into D
                    log_norm = None
                    if cfg.reinforce == "softmax":  # log sum_e exp(h_t . e / tau), allowed e
                        log_norm = domain_logsumexp(
                            h / cfg.g_temperature, gen.item_emb, batch.domain,
                            self.offsets, exclude, cfg.topk_chunk,
                        )  # (B,)  # fmt: skip
                    out["loss_g"], advantage = reinforce_loss(
                        g_fake, reward, valid, cfg.reinforce, log_norm, cfg.g_temperature
                    )  # Eq. 14
                    if self.health is not None and self.training:
                        self.health.observe(batch, fakes, valid, reward, advantage)
                    if cfg.g_supervised > 0:  # G anchored to the user's real click
                        g_real = gen.logits(h, real_items)  # (B, 1 + K)
                        out["loss_g_sup"] = (
                            bce_sum(g_real[:, 0], 1.0) + bce_sum(g_real[:, 1:], 0.0)
                        ) / g_real.numel()
                    if cfg.lambda_m > 0:
                        out["loss_mmd"] = self.mmd_loss(batch, fakes, g_fake, valid)
            total = total + (1.0 if warmup else cfg.lambda_g) * out["loss_g"]  # Eq. 16
            if "loss_g_sup" in out:
                total = total + cfg.g_supervised * out["loss_g_sup"]
            if "loss_mmd" in out:
                total = total + cfg.lambda_m * out["loss_mmd"]
        out["loss"] = total
        return out

    def mmd_loss(
        self, batch: Batch, fakes: torch.Tensor, g_fake: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 15: minus the mean over the batch's (user, target domain) pairs of the squared
        MMD between G's fakes and the real clicks (target-domain history plus the positive).

        The fakes are a discrete top-k, so the gradient reaches G through (i) the fakes'
        representation, G's own item embeddings, and (ii) their weights, G's probabilities
        renormalised over the user's top-k (softmax of the logits h_t . e). The real clicks
        are the fixed target (detached). Embeddings are L2-normalised before the kernel, so
        the MMD measures where the fakes point rather than how long their vectors are and
        cannot be maximised by inflating the fakes' norms."""
        assert self.generator is not None and batch.pos is not None
        emb = self.generator.item_emb
        real = torch.cat([target_rows(batch.history, batch.domain), batch.pos[:, None]], dim=1)
        wy = (real != self.info.pad).to(g_fake.dtype)  # (B, L + 1)
        wy = wy / wy.sum(1, keepdim=True)
        cross = self.cfg.mmd_form == "cross"
        if cross:  # every valid fake weighs the same; no gradient through the weights
            wx = valid.to(g_fake.dtype) / valid.sum(1, keepdim=True).clamp(min=1)
        else:
            low = torch.finfo(g_fake.dtype).min  # finite: a row without fakes stays NaN-free
            wx = g_fake.masked_fill(~valid, low).softmax(dim=1)  # (B, k)
        has = valid.any(dim=1)  # rows without any fake contribute nothing
        x = F.normalize(emb(fakes), dim=-1)  # (B, k, dim)
        y = F.normalize(emb(real), dim=-1).detach()  # (B, L + 1, dim); pad rows -> 0, weight 0
        mmd2 = gaussian_mmd2(x, wx, y, wy, self.cfg.mmd_sigma, cross_only=cross)  # (B,)
        return -(mmd2 * has).sum() / has.sum().clamp(min=1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.losses(batch)


# the paper's rows (Tables 2 and 3): aft-d 12, aft-hnm 13, aft-paper 14 (not in the paper:
# its AFT (D+G) as printed, next to ours), aft 15
@register_model("aft-paper", AFTPaperConfig, paper_name="AFT (D+G), G as printed", paper_row=14,
                quick=QUICK, tune={**DROPOUT, **LAMBDA_M})  # fmt: skip
class AFTPaper(AFT):
    """AFT (D+G) with G trained exactly as section 3 prints it (see :class:`AFTPaperConfig`)."""


@register_model("aft-d", AFTDConfig, paper_name="AFT (D)", paper_row=12, quick=QUICK,
                inert_keys=AFTDConfig.INERT_KEYS, tune=DROPOUT)  # fmt: skip
class AFTD(AFT):
    """AFT (D): the discriminator alone, trained on random unclicked negatives."""


@register_model("aft-hnm", AFTHNMConfig, paper_name="AFT (D+HNM)", paper_row=13, quick=QUICK,
                inert_keys=AFTHNMConfig.INERT_KEYS, tune=TUNE_HNM)  # fmt: skip
class AFTHNM(AFT):
    """AFT (D+HNM): the discriminator with hard negatives mined from its own ranking."""
