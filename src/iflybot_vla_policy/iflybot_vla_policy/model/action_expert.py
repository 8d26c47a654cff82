"""Action expert: a DiT trained with flow matching that cross-attends the VLM's per-layer KV.

Tokens = [state, noisy action chunk] (plus learned positions), bidirectional self-attention;
adaLN-Zero modulation from the flow timestep (and, on the tiny preset, a flat vision readout).
Block i cross-attends the cached keys/values of VLM layer i, projected when the head widths
differ, grouped-query through SDPA `enable_gqa`, with padding and FAST-token positions masked
out; with `direct_vision` it also attends the image tokens straight from the vision tower, a path
that does not depend on the LM having learned cross-modal fusion.

Flow matching as in pi0: x_t = t * noise + (1 - t) * actions, target velocity noise - actions,
t ~ t_min + (1 - t_min) * Beta(1.5, 1); sampling integrates from t = 1 to 0 in N Euler steps.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iflybot_vla_policy.config import VLAConfig
from iflybot_vla_policy.model.derived import Dense, derived

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ExpertContext:
    """Per-block keys/values the expert attends, computed once per chunk."""

    keys: list[torch.Tensor]     # per block (B, kv_heads, S', head_dim_expert)
    values: list[torch.Tensor]
    mask: torch.Tensor | None    # (B, 1, 1, S') bool: True = attend; None: every key
    summary: torch.Tensor | None  # (B, width) projected vision readout


@dataclass
class Conditioning:
    """Timestep (+ vision summary) modulations: per block (B, 9 * width), final (B, 2 * width)."""

    blocks: list[torch.Tensor]
    final: torch.Tensor

    def step(self, i: int, batch: int) -> Conditioning:
        """Rows of step i from a conditioning computed for all steps stacked step-major."""
        rows = slice(i * batch, (i + 1) * batch)
        return Conditioning([m[rows] for m in self.blocks], self.final[rows])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, vlm_head_dim: int,
                 feature_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = width // heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.q_cross = nn.Linear(width, width)
        self.cross_out = nn.Linear(width, width)
        kv_in, kv_out = kv_heads * vlm_head_dim, kv_heads * self.head_dim
        # project the VLM's keys/values only when the head widths differ
        self.k_proj = nn.Linear(kv_in, kv_out) if vlm_head_dim != self.head_dim else None
        self.v_proj = nn.Linear(kv_in, kv_out) if vlm_head_dim != self.head_dim else None
        if feature_dim:
            self.feat_norm = nn.LayerNorm(feature_dim)
            self.k_feat = nn.Linear(feature_dim, kv_out)
            self.v_feat = nn.Linear(feature_dim, kv_out)
        else:
            self.feat_norm = self.k_feat = self.v_feat = None
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate='tanh'),
                                 nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)
        self.checkpointing = False  # recompute the block in the backward (training passes)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, S, n * hd) -> (B, n, S, hd)."""
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    def context(self, k: torch.Tensor, v: torch.Tensor,
                features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """VLM k, v (B, kvh, S, hd_vlm) [+ features (B, N, F)] -> (B, kvh, S [+ N], hd)."""
        if self.k_proj is not None:
            b, h, s, d = k.shape
            k = self._heads(self.k_proj(k.transpose(1, 2).reshape(b, s, h * d)), h)
            v = self._heads(self.v_proj(v.transpose(1, 2).reshape(b, s, h * d)), h)
        if self.k_feat is not None and features is not None:
            f = self.feat_norm(features)
            k = torch.cat([k, self._heads(self.k_feat(f), self.kv_heads)], dim=2)
            v = torch.cat([v, self._heads(self.v_feat(f), self.kv_heads)], dim=2)
        return k, v

    def forward(self, x: torch.Tensor, cond: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The training step (`ActionExpert.forward_train`): from the conditioning vector cond
        (B, width) and this block's VLM layer keys/values k, v (B, kvh, S, hd_vlm) [+ image
        features], mask (B, 1, 1, S [+ N]). The adaLN modulations and the context projections
        happen inside the block's own call, so an FSDP unit around the block gathers every
        parameter it uses and activation checkpointing recomputes all of it."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._train_step, x, cond, k, v, mask, features,
                              use_reentrant=False)
        return self._train_step(x, cond, k, v, mask, features)

    def _train_step(self, x: torch.Tensor, cond: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, mask: torch.Tensor,
                    features: torch.Tensor | None) -> torch.Tensor:
        k, v = self.context(k, v, features)
        return self.step(x, self.ada(cond), k, v, mask)

    def step(self, x: torch.Tensor, mods: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """With the modulations and context precomputed (inference): mods = ada(cond)
        (B, 9 * width) shift/scale/gate of the three sub-layers, k, v from `context`."""
        sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3 = mods.chunk(9, dim=-1)
        h = _modulate(self.norm1(x), sh1, sc1)
        q, kk, vv = (self._heads(t, self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, kk, vv)                 # bidirectional
        x = x + g1[:, None] * self.attn_out(a.transpose(1, 2).flatten(2))
        h = _modulate(self.norm2(x), sh2, sc2)
        q = self._heads(self.q_cross(h), self.heads)
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           enable_gqa=self.heads != self.kv_heads)
        x = x + g2[:, None] * self.cross_out(a.transpose(1, 2).flatten(2))
        h = _modulate(self.norm3(x), sh3, sc3)
        return x + g3[:, None] * self.mlp(h)


class ActionExpert(nn.Module):
    """One DiT block per VLM layer; predicts the flow velocity of the whole chunk."""

    def __init__(self, cfg: VLAConfig, n_layers: int, kv_heads: int, vlm_head_dim: int,
                 feature_dim: int = 0) -> None:
        super().__init__()
        e, a = cfg.expert, cfg.action
        self.cfg = cfg
        w = e.width
        self.state_in = nn.Linear(a.state_dim, w)
        self.action_in = nn.Linear(a.action_dim, w)
        self.pos = nn.Parameter(torch.randn(1 + a.horizon, w) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        feat = feature_dim if e.direct_vision else 0
        self.summary_cond = nn.Linear(feat, w) if feat else None
        self.summary_state = nn.Linear(feat, w) if feat else None
        self.blocks = nn.ModuleList(DiTBlock(w, e.heads, kv_heads, vlm_head_dim, feat,
                                             e.mlp_ratio) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        self.out = nn.Linear(w, a.action_dim)

    def _inputs(self, kv: KV, mask: torch.Tensor, features: torch.Tensor | None,
                summary: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The features the blocks attend (None without a direct vision path), the key mask
        (B, 1, 1, S [+ N]) and the summary the expert reads (None without one)."""
        if len(kv) != len(self.blocks):
            raise ValueError(f'expert has {len(self.blocks)} blocks but got KV of {len(kv)} '
                             'VLM layers')
        feats = features if features is not None and self.blocks[0].k_feat is not None \
            else None
        if feats is not None:
            mask = torch.cat([mask, mask.new_ones(feats.shape[:2])], dim=1)
        summ = summary if self.summary_cond is not None else None
        return feats, mask[:, None, None, :].bool(), summ

    def context(self, kv: KV, mask: torch.Tensor, features: torch.Tensor | None = None,
                summary: torch.Tensor | None = None) -> ExpertContext:
        """kv per VLM layer (B, kvh, S, hd), mask (B, S) bool -> per-block attention inputs."""
        feats, mask, summ = self._inputs(kv, mask, features, summary)
        keys, values = [], []
        for block, (k, v) in zip(self.blocks, kv, strict=True):
            kk, vv = block.context(k, v, feats)
            keys.append(kk)
            values.append(vv)
        return ExpertContext(keys, values, mask, summ)

    def _cond(self, t: torch.Tensor, summary: torch.Tensor | None) -> torch.Tensor:
        """Timestep (+ vision summary) conditioning vector (B, width)."""
        w = self.pos.shape[-1]
        cond = self.time_mlp(timestep_embedding(t, w).to(self.pos.dtype))
        if summary is not None:
            cond = cond + self.summary_cond(summary.to(cond.dtype))
        return cond

    def conditioning(self, t: torch.Tensor, ctx: ExpertContext) -> Conditioning:
        """adaLN modulations of every block for timesteps t (B,): the part of a denoising step
        that does not depend on x_t, so a sampler can compute it for all steps in one go."""
        cond = self._cond(t, ctx.summary)
        return Conditioning([b.ada(cond) for b in self.blocks], self.final_ada(cond))

    def _tokens(self, state: torch.Tensor, x_t: torch.Tensor,
                summary: torch.Tensor | None) -> torch.Tensor:
        """[state token, noisy actions] + learned positions (B, 1 + H, width)."""
        dtype = self.pos.dtype
        s_tok = self.state_in(state.to(dtype))
        if summary is not None:
            s_tok = s_tok + self.summary_state(summary.to(dtype))
        return torch.cat([s_tok[:, None], self.action_in(x_t.to(dtype))], dim=1) + self.pos

    def _velocity(self, x: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        shift, scale = final.chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(x[:, 1:]), shift, scale))

    def forward(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                ctx: ExpertContext, cond: Conditioning | None = None) -> torch.Tensor:
        """state (B, Ds), x_t (B, H, Da), t (B,) -> velocity (B, H, Da), from a precomputed
        context (and modulations): the sampling path."""
        cond = cond if cond is not None else self.conditioning(t, ctx)
        x = self._tokens(state, x_t, ctx.summary)
        for block, mods, k, v in zip(self.blocks, cond.blocks, ctx.keys, ctx.values,
                                     strict=True):
            x = block.step(x, mods, k, v, ctx.mask)
        return self._velocity(x, cond.final)

    def forward_train(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, kv: KV,
                      mask: torch.Tensor, features: torch.Tensor | None = None,
                      summary: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(state, x_t, t, context(kv, mask, features, summary))` as training runs it:
        each block projects its context and computes its modulations inside its own call
        (`DiTBlock.forward`), where FSDP has gathered its parameters and activation
        checkpointing can recompute it. Same velocity as the sampling path."""
        feats, mask, summ = self._inputs(kv, mask, features, summary)
        cond = self._cond(t, summ)
        x = self._tokens(state, x_t, summ)
        for block, (k, v) in zip(self.blocks, kv, strict=True):
            x = block(x, cond, k, v, mask, feats)
        return self._velocity(x, self.final_ada(cond))

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each DiT block in the backward of a training pass."""
        for block in self.blocks:
            block.checkpointing = enabled


def sample_flow_time(batch: int, cfg: VLAConfig, device: torch.device | str = 'cpu',
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """pi0-style timestep sampling emphasising noisy t: (B,) in [t_min, 1]."""
    f = cfg.flow
    # torch's Beta sampler takes no generator; with one given and b == 1 (pi0's Beta(1.5, 1))
    # sample exactly by the inverse CDF u^(1/a), otherwise use the global RNG.
    if generator is not None and f.beta_beta == 1.0:
        u = torch.rand(batch, generator=generator, device=device)
        beta = u ** (1.0 / f.beta_alpha)  # Beta(a, 1) by inverse CDF
    else:
        beta = torch.distributions.Beta(f.beta_alpha, f.beta_beta).sample((batch,)).to(device)
    return f.t_min + (1 - f.t_min) * beta


def flow_targets(actions: torch.Tensor, noise: torch.Tensor,
                 t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear path: x_t (B, H, D) and the velocity target noise - actions."""
    tt = t[:, None, None].to(actions.dtype)
    return tt * noise + (1 - tt) * actions, noise - actions


def flow_times(steps: int) -> list[float]:
    """The Euler grid from t = 1 (noise) towards 0: t_i = 1 - i / steps, i < steps."""
    dt = -1.0 / steps
    return [1.0 + i * dt for i in range(steps)]


@dataclass
class EagerSteps:
    """The modules' own velocity per Euler step with a fixed context, the adaLN modulations of
    every step computed in one batched pass (the timesteps are known in advance)."""

    expert: ActionExpert
    state: torch.Tensor           # (B, Ds)
    ctx: ExpertContext
    cond: Conditioning            # all steps, step-major
    times: list[float]

    @classmethod
    def build(cls, expert: ActionExpert, state: torch.Tensor, ctx: ExpertContext,
              steps: int) -> EagerSteps:
        b, times = state.shape[0], flow_times(steps)
        t_all = torch.tensor(times, device=state.device).repeat_interleave(b)      # (N * B,)
        summary = None if ctx.summary is None else ctx.summary.repeat(steps, 1)  # step-major
        cond = expert.conditioning(t_all, dataclasses.replace(ctx, summary=summary))
        return cls(expert, state, ctx, cond, times)

    def velocity(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x_t (B, H, Da) at step i -> v (B, H, Da)."""
        b = x.shape[0]
        t = torch.full((b,), self.times[i], device=x.device, dtype=torch.float32)
        return self.expert(self.state, x, t, self.ctx, self.cond.step(i, b))


def euler_sample(expert: ActionExpert, state: torch.Tensor, noise: torch.Tensor,
                 ctx_fn, steps: int, reuse_context: bool = True) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to 0 in `steps` Euler steps.

    ctx_fn(step) -> ExpertContext. With reuse_context (the normal path) it is called once and
    the adaLN modulations of all steps are computed in one batched pass (`EagerSteps`);
    otherwise the context is rebuilt every step (the equality check against recomputing the
    prefix, and any caller that needs a fresh context).
    """
    x = noise
    b = x.shape[0]
    dt = -1.0 / steps
    times = flow_times(steps)
    if reuse_context and isinstance(expert, ActionExpert):
        eager = EagerSteps.build(expert, state, ctx_fn(0), steps)
        for i in range(steps):
            x = x + dt * eager.velocity(x, i).to(x.dtype)
        return x
    ctx = ctx_fn(0) if reuse_context else None
    for i, t_i in enumerate(times):
        t = torch.full((b,), t_i, device=x.device, dtype=torch.float32)
        v = expert(state, x, t, ctx if reuse_context else ctx_fn(i))
        x = x + dt * v.to(x.dtype)
    return x


def _step_mods(cond: Conditioning, steps: int, batch: int) -> tuple[list, list]:
    """Per step, per block the nine modulations (shift, 1 + scale, gate for each sub-layer)
    and per step the final (shift, 1 + scale), sliced once per chunk, not at every step.
    Shapes (B, 1, width); at batch 1 the shift/scale pairs are (width,) vectors, which
    `F.layer_norm` applies as its affine (one op instead of two)."""
    blocks = []
    for m in cond.blocks:                                     # (N * B, 9 * w), step-major
        m = m.view(steps, batch, 9, 1, -1).clone()
        m[:, :, 1::3] += 1                                    # sc1, sc2, sc3
        if batch == 1:
            m = m.view(steps, 9, -1)
            blocks.append([s.unbind(0) for s in m.unbind(0)])
        else:
            blocks.append([s.unbind(1) for s in m.unbind(0)])
    final = cond.final.view(steps, batch, 2, 1, -1).clone()
    final[:, :, 1] += 1
    finals = [f.view(2, -1).unbind(0) if batch == 1 else f.unbind(1) for f in final.unbind(0)]
    return [[b[i] for b in blocks] for i in range(steps)], finals


def _norm_mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """_modulate(LayerNorm(x), ...) with scale already 1 + scale."""
    if shift.dim() == 1:
        return F.layer_norm(x, x.shape[-1:], scale, shift, eps=1e-6)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), scale)


def _expert_weights(expert: ActionExpert) -> tuple:
    """The fast path's weights, derived once (`derived`): action_in, out, per block (qkv,
    attn_out, q_cross, cross_out, fc1, fc2), every adaLN head (blocks', then the final one) as
    one `Dense`, and the context projections: per block (k_proj, v_proj) and one `Dense` for
    all blocks' feature keys and values with their LayerNorm affines folded in (None when the
    blocks' norms differ in eps or there is no direct vision path)."""
    def parts() -> tuple[list, list, list]:
        names = ('qkv', 'attn_out', 'q_cross', 'cross_out')
        blocks = list(expert.blocks)
        per_block = [[getattr(b, n) for n in names] + [b.mlp[0], b.mlp[2]] for b in blocks]
        return blocks, per_block, [b.ada[-1] for b in blocks] + [expert.final_ada[-1]]

    def sources() -> list[torch.Tensor]:
        blocks, per_block, ada = parts()
        proj = [m for b in blocks for m in (b.k_proj, b.v_proj, b.k_feat, b.v_feat,
                                            b.feat_norm) if m is not None]
        mods = [expert.action_in, expert.out, *ada, *proj, *(m for ms in per_block for m in ms)]
        return [t for m in mods for t in m.parameters()]

    def build() -> tuple:
        blocks, per_block, ada = parts()
        feat = None
        first = blocks[0]
        if first.k_feat is not None and len({b.feat_norm.eps for b in blocks}) == 1:
            weights, biases = [], []
            for b in blocks:        # Linear(LN(x)) = Linear'(x_hat): LN's affine folded in
                for lin in (b.k_feat, b.v_feat):
                    weights.append(lin.weight * b.feat_norm.weight)
                    biases.append(lin.weight @ b.feat_norm.bias + lin.bias)
            feat = (Dense(torch.cat(weights), torch.cat(biases)), first.feat_norm.eps)
        kv = [(None if b.k_proj is None else Dense.of(b.k_proj),
               None if b.v_proj is None else Dense.of(b.v_proj)) for b in blocks]
        return (Dense.of(expert.action_in), Dense.of(expert.out),
                [tuple(Dense.of(m) for m in ms) for ms in per_block],
                Dense(torch.cat([m.weight for m in ada]), torch.cat([m.bias for m in ada])),
                kv, feat)

    return derived(expert, '_fast_cache', sources, build)


def context_fast(expert: ActionExpert, kv: KV, mask: torch.Tensor | None,
                 features: torch.Tensor | None = None,
                 summary: torch.Tensor | None = None) -> ExpertContext:
    """`ActionExpert.context` for inference: the feature keys/values of every block from one
    normalisation and one matrix product. mask (B, S) or None (every key is real) -> a
    context whose mask is None when every key is real."""
    *_, proj, feat = _expert_weights(expert)
    if features is None or feat is None:
        b, s = kv[0][0].shape[0], kv[0][0].shape[2]
        full = mask if mask is not None else kv[0][0].new_ones(b, s, dtype=torch.bool)
        ctx = expert.context(kv, full, features, summary)
        return ctx if mask is not None else dataclasses.replace(ctx, mask=None)
    if len(kv) != len(expert.blocks):
        raise ValueError(f'expert has {len(expert.blocks)} blocks but got KV of {len(kv)} '
                         'VLM layers')
    fused, eps = feat
    f = fused(F.layer_norm(features, features.shape[-1:], eps=eps))    # (B, N, blocks*2*kvd)
    keys, values = [], []
    per_block = [c.chunk(2, dim=-1) for c in f.chunk(len(expert.blocks), dim=-1)]
    for block, (k, v), (k_proj, v_proj), (kf, vf) in zip(expert.blocks, kv, proj, per_block,
                                                          strict=True):
        if k_proj is not None:
            b, h, s, d = k.shape
            k = block._heads(k_proj(k.transpose(1, 2).reshape(b, s, h * d)), h)
            v = block._heads(v_proj(v.transpose(1, 2).reshape(b, s, h * d)), h)
        keys.append(torch.cat([k, block._heads(kf, block.kv_heads)], dim=2))
        values.append(torch.cat([v, block._heads(vf, block.kv_heads)], dim=2))
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(features.shape[:2])], dim=1)[:, None, None, :]
    summ = summary if expert.summary_cond is not None else None
    return ExpertContext(keys, values, None if mask is None else mask.bool(), summ)


def _conditioning_fast(expert: ActionExpert, t: torch.Tensor,
                       summary: torch.Tensor | None, ada: Dense) -> Conditioning:
    """`ActionExpert.conditioning` with every adaLN head in one matrix product."""
    w = expert.pos.shape[-1]
    cond = expert.time_mlp(timestep_embedding(t, w).to(expert.pos.dtype))
    if summary is not None:
        cond = cond + expert.summary_cond(summary.to(cond.dtype))
    mods = ada(F.silu(cond))
    n = len(expert.blocks)
    *blocks, final = mods.split([9 * w] * n + [2 * w], dim=-1)
    return Conditioning(blocks, final)


def _block_fast(block: DiTBlock, w: tuple, x: torch.Tensor, mods: tuple, k: torch.Tensor,
                v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DiTBlock.forward with the modulations precomputed, fused multiply-adds and `Dense`."""
    sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3 = mods
    qkv, attn_out, q_cross, cross_out, fc1, fc2 = w
    b, n, width = x.shape
    heads = block.heads
    q, kk, vv = qkv(_norm_mod(x, sh1, sc1)).view(b, n, 3, heads, -1).permute(
        2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, kk, vv).transpose(1, 2).reshape(b, n, width)
    x = torch.addcmul(x, g1, attn_out(a))
    q = q_cross(_norm_mod(x, sh2, sc2)).view(b, n, heads, -1).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                       enable_gqa=heads != block.kv_heads)
    x = torch.addcmul(x, g2, cross_out(a.transpose(1, 2).reshape(b, n, width)))
    h = F.gelu(fc1(_norm_mod(x, sh3, sc3)), approximate='tanh')
    return torch.addcmul(x, g3, fc2(h))


@dataclass
class FastSteps:
    """The fast sampler's per-chunk state: everything that does not depend on x_t (the adaLN
    modulations of all steps, the state token, the keys/values, the weights in `Dense`
    layout), so that each step is the bare DiT arithmetic (no module calls, fused
    multiply-adds)."""

    blocks: list            # per block (DiTBlock, its Dense weights, keys, values)
    mask: torch.Tensor | None
    action_in: Dense
    out: Dense
    step_mods: list         # per step, per block the nine modulations (`_step_mods`)
    finals: list            # per step the final (shift, 1 + scale)
    s_tok: torch.Tensor     # (B, 1, width) state token with its position
    pos: torch.Tensor       # (H, width) action positions

    @classmethod
    def build(cls, expert: ActionExpert, state: torch.Tensor, ctx: ExpertContext,
              steps: int) -> FastSteps:
        b, dtype = state.shape[0], expert.pos.dtype
        t_all = torch.tensor(flow_times(steps), device=state.device).repeat_interleave(b)
        summary = None if ctx.summary is None else ctx.summary.repeat(steps, 1)   # step-major
        action_in, out, weights, ada, *_ = _expert_weights(expert)
        step_mods, finals = _step_mods(_conditioning_fast(expert, t_all, summary, ada), steps,
                                       b)
        s_tok = expert.state_in(state.to(dtype))
        if ctx.summary is not None:
            s_tok = s_tok + expert.summary_state(ctx.summary.to(dtype))
        blocks = list(zip(expert.blocks, weights, ctx.keys, ctx.values, strict=True))
        return cls(blocks, ctx.mask, action_in, out, step_mods, finals,
                   s_tok[:, None] + expert.pos[:1], expert.pos[1:])

    def velocity(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x_t (B, H, Da) at step i -> v (B, H, Da)."""
        h = torch.cat([self.s_tok, self.action_in(x.to(self.pos.dtype)) + self.pos], dim=1)
        for (block, w, k, v), mods in zip(self.blocks, self.step_mods[i], strict=True):
            h = _block_fast(block, w, h, mods, k, v, self.mask)
        shift, scale = self.finals[i]
        return self.out(_norm_mod(h[:, 1:], shift, scale))


def euler_sample_fast(expert: ActionExpert, state: torch.Tensor, noise: torch.Tensor,
                      ctx: ExpertContext, steps: int) -> torch.Tensor:
    """`euler_sample` with a fixed context, as inference runs it (`FastSteps`). Same result as
    `euler_sample` up to float rounding (~1e-6)."""
    x = noise
    dt = -1.0 / steps
    fast = FastSteps.build(expert, state, ctx, steps)
    for i in range(steps):
        x = x + dt * fast.velocity(x, i).to(x.dtype)
    return x
