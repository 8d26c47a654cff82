"""The VLM backbone: one interface, three implementations.

Interface (`Backbone`):
- `forward_train(images, text_ids, text_mask, suffix_ids, suffix_mask)`: one causal pass over
  [image tokens, instruction, suffix tokens (latent + FAST, or a VQA answer)] returning the
  logits that predict each suffix token and the per-layer KV (with gradients) for the expert.
- `encode_prefix(images, text_ids, text_mask) -> PrefixCache`: images + instruction once; the
  per-layer KV cache, its key mask and the logits for the next token.
- `append_tokens(prefix, ids)` / `generate_latents(prefix, n, ...)`: extend the cache.

Implementations: `TinyBackbone` (tiny_backbone.py: a transformers Qwen2 decoder built from
config, fed by our conv vision tower), `Qwen25VLBackbone` (the paper's Qwen2.5-VL) and
`SmolVLMBackbone` (Idefics3/SmolVLM), both in vlm_backbones.py. Each is built from config
(random init) or loaded from a local directory with `local_files_only=True`: nothing is ever
fetched from the hub.

A pretrained directory's chat template shapes the prefix of the transformers families as their
processor would: [template head (system turn, user turn opening)][image tokens][instruction +
template tail (assistant turn opening)]; exact for Qwen2.5-VL, whose template puts the images
right before the text (the tokenizer renders the template, see text_tokenizer.py).

Positions are explicit everywhere (`cumsum(mask) - 1` over real tokens; 3-D mRoPE for image
tokens in Qwen2.5-VL), so padding inside the prefix changes nothing for the real tokens.

Activation checkpointing (`set_activation_checkpointing`, the trainer's
`trainer.activation_checkpointing`): transformers' own per-layer checkpointing, non-reentrant,
on every decoder layer and vision block. The expert needs each layer's keys and values with
their gradients, and transformers drops the KV cache under checkpointing because a
`DynamicCache` would append them a second time when the backward recomputes the layer. So
`forward_train` hands the decoder a `_KVRecord` cache instead: one slot per layer that each call
overwrites, so a recomputation writes the same tensors again, and the keys/values the expert
reads are ordinary outputs of the checkpointed layer's graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iflybot_vla_policy.config import VLAConfig
from iflybot_vla_policy.model.derived import Dense, derived
from iflybot_vla_policy.model.kv_cache import KV, StaticKV
from iflybot_vla_policy.model.text_tokenizer import TextTokenizer


@dataclass
class PrefixCache:
    """What the expert and latent generation need from one encoded prefix."""

    kv: KV                       # per layer, after rotary encoding
    mask: torch.Tensor           # (B, S) bool: keys the expert may attend (real, non-FAST)
    next_pos: torch.Tensor       # (B,) position of the next token to append
    next_logits: torch.Tensor | None  # (B, V) logits for the next token; fast path: (B,
    #                                   codebook) latent rows, None when no token follows
    features: torch.Tensor | None  # (B, N_img, D) image tokens (direct expert path)
    summary: torch.Tensor | None   # (B, D) flat vision readout (direct expert path)
    cache: object | None = None  # transformers DynamicCache (append_tokens) or StaticKV


@dataclass
class TrainOutput:
    logits: torch.Tensor         # (B, L, V): logits[:, j] predicts suffix token j
    kv: KV                       # per layer over [prefix, suffix]
    mask: torch.Tensor           # (B, S + L) bool real tokens
    prefix_len: int
    features: torch.Tensor | None
    summary: torch.Tensor | None


@dataclass
class _Inputs:
    embeds: torch.Tensor         # (B, S, D)
    mask: torch.Tensor           # (B, S) long
    positions: torch.Tensor      # (A, B, S): A = 1 (1-D RoPE) or 3 (mRoPE)
    features: torch.Tensor | None
    summary: torch.Tensor | None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in transformers' Llama/Qwen2 (rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _kv_record():
    """A transformers cache for one teacher-forced pass (see the module docstring): each layer
    keeps the keys/values of its latest call, without the copy a DynamicCache's concatenation
    makes, and a layer recomputed under checkpointing writes the same tensors again."""
    from transformers.cache_utils import Cache, DynamicLayer

    class _KVRecord(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    return Cache(layer_class_to_replicate=_KVRecord)


def _positions_1d(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) mask -> (1, B, S) positions counting real tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[None]


class Backbone(nn.Module):
    """Common logic over a transformers decoder: subclasses provide `_prefix` and the modules."""

    position_axes = 1   # rotary position axes (Qwen2.5-VL's mRoPE: 3)

    decoder: nn.Module           # accepts inputs_embeds, attention_mask, position_ids, cache
    lm_head: nn.Linear
    tokenizer: TextTokenizer

    def __init__(self, cfg: VLAConfig) -> None:
        super().__init__()
        self.cfg = cfg

    # -- geometry the expert needs
    @property
    def n_layers(self) -> int:
        return self.decoder.config.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return self.decoder.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        c = self.decoder.config
        return getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads

    @property
    def hidden(self) -> int:
        return self.decoder.config.hidden_size

    @property
    def feature_dim(self) -> int:
        """Width of `features`/`summary` for the expert's direct path (the LM width here)."""
        return self.hidden

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a local model directory (transformers format + tokenizer.json) that a config
        with `backbone.path` pointing at it loads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(d)
        self.tokenizer.save(d / 'tokenizer.json')
        return d

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def tie_weights(self) -> None:
        """Re-tie the LM head to the input embeddings when the config ties them (FSDP's
        loading through the meta device replaces every parameter and calls this after)."""
        self.hf.tie_weights()

    # -- activation checkpointing

    def checkpointed_modules(self) -> list[nn.Module]:
        """The blocks whose activations are recomputed in the backward when checkpointing is
        on: every decoder layer and vision block of the transformers model."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.hf.modules() if isinstance(m, GradientCheckpointingLayer)]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer and vision block in the backward instead of keeping
        its activations (transformers' checkpointing, non-reentrant: the layer's keys/values
        leave it with their graph, which `forward_train` hands to the expert). Only training
        passes (module in train mode, gradients on) are checkpointed."""
        if enabled:
            from transformers.modeling_layers import GradientCheckpointingLayer

            if not hasattr(GradientCheckpointingLayer, '_can_checkpoint_with_cache'):
                import transformers
                raise RuntimeError(f'activation checkpointing needs a transformers whose '
                                   f'checkpointed layers can keep a cache (the pinned one, '
                                   f'requirements.txt); this is {transformers.__version__}')
            self.hf.activation_checkpointing_enable({'use_reentrant': False})
            # transformers also hooks the input embeddings to output tensors that require grad,
            # which only reentrant checkpointing needs (and which would tag inference outputs)
            self.hf.disable_input_require_grads()
        elif self.hf.is_activation_checkpointing:
            self.hf.activation_checkpointing_disable()
        for layer in self.decoder.layers:
            # keep the cache under checkpointing: forward_train's `_kv_record` overwrites its
            # slot, so the recomputation in the backward writes the same keys/values again
            layer._can_checkpoint_with_cache = enabled

    @property
    def activation_checkpointing(self) -> bool:
        return bool(self.hf.is_activation_checkpointing)

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        raise NotImplementedError

    def _pos_arg(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0] if positions.shape[0] == 1 else positions

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: object | None = None, use_cache: bool = True):
        """The decoder over embeds; `cache` None starts a DynamicCache (for append_tokens).
        Under activation checkpointing a DynamicCache may only be used without a backward
        through it (inference): training passes go through forward_train's `_kv_record`."""
        return self.decoder(inputs_embeds=embeds, attention_mask=mask,
                            position_ids=self._pos_arg(positions), past_key_values=cache,
                            use_cache=use_cache)

    @staticmethod
    def _kv(cache) -> KV:
        return [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def _last_real(mask: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B,) index of the last real token."""
        idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return torch.where(mask.bool(), idx, -1).amax(-1)

    def forward_train(self, images: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor, suffix_ids: torch.Tensor,
                      suffix_mask: torch.Tensor) -> TrainOutput:
        """Teacher-forced pass; suffix_ids (B, L) are vocabulary ids (pads anything valid)."""
        p = self._prefix(images, text_ids, text_mask)
        s = p.embeds.shape[1]
        n_suffix = suffix_ids.shape[1]
        next_pos = p.positions.amax(dim=(0, 2)) + 1                               # (B,)
        suffix_pos = next_pos[:, None] + (suffix_mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = torch.cat([p.positions, suffix_pos[None].expand(p.positions.shape[0], -1,
                                                                    -1)], dim=-1)
        embeds = torch.cat([p.embeds, self.embed(suffix_ids)], dim=1)
        mask = torch.cat([p.mask, suffix_mask.long()], dim=1)
        # the layers write into `record` whatever use_cache says (transformers turns use_cache
        # off under checkpointing, and with it the returned cache)
        record = _kv_record()
        out = self._run(embeds, mask, positions, record, use_cache=False)
        hidden = out.last_hidden_state
        # suffix token 0 is predicted from the last real prefix token, token j from suffix j-1
        first = self._last_real(p.mask)                                           # (B,)
        rows = torch.cat([first[:, None], s + torch.arange(n_suffix - 1, device=first.device)
                          .expand(len(first), -1)], dim=1)                        # (B, L)
        picked = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        return TrainOutput(logits=self.lm_head(picked), kv=self._kv(record),
                           mask=mask.bool(), prefix_len=s, features=p.features,
                           summary=p.summary)

    def encode_prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor) -> PrefixCache:
        p = self._prefix(images, text_ids, text_mask)
        out = self._run(p.embeds, p.mask, p.positions)
        hidden = out.last_hidden_state
        last = self._last_real(p.mask)
        logits = self.lm_head(hidden[torch.arange(len(last)), last])
        return PrefixCache(kv=self._kv(out.past_key_values), mask=p.mask.bool(),
                           next_pos=p.positions.amax(dim=(0, 2)) + 1, next_logits=logits,
                           features=p.features, summary=p.summary, cache=out.past_key_values)

    # decoders whose layers are plain Llama/Qwen2 blocks (1-D RoPE) take the lean decode path
    lean_decode = False

    def append_tokens(self, prefix: PrefixCache, ids: torch.Tensor,
                      rows: slice | None = None) -> PrefixCache:
        """Feed ids (B, k) after the cached prefix; returns the extended cache. `rows` limits
        next_logits to a slice of the vocabulary (ids outside it then read as -inf)."""
        if self.lean_decode:
            return self._append_lean(prefix, ids, rows)
        k = ids.shape[1]
        positions = prefix.next_pos[:, None] + torch.arange(k, device=ids.device)   # (B, k)
        axes = self.position_axes
        mask = torch.cat([prefix.mask.long(), torch.ones_like(ids)], dim=1)
        out = self._run(self.embed(ids), mask, positions[None].expand(axes, -1, -1),
                        prefix.cache)
        return PrefixCache(kv=self._kv(out.past_key_values), mask=mask.bool(),
                           next_pos=prefix.next_pos + k,
                           next_logits=self._logits(out.last_hidden_state[:, -1], rows),
                           features=prefix.features, summary=prefix.summary,
                           cache=out.past_key_values)

    def _logits(self, h: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """h (B, D) -> logits (B, V); with rows, only those are computed (others -inf)."""
        if rows is None:
            return self.lm_head(h)
        w = self.lm_head.weight[rows]
        b = None if self.lm_head.bias is None else self.lm_head.bias[rows]
        out = h.new_full((h.shape[0], self.lm_head.out_features), float('-inf'))
        out[:, rows] = F.linear(h, w, b)
        return out

    def _fused_layers(self) -> list[tuple]:
        """Per layer (qkv weight, qkv bias, gate|up weight, norm weights, eps): fewer, larger
        ops per decoded token. Cached under inference_mode, keyed by the storage and version
        counter of every source weight, so an optimiser step or a load invalidates it."""
        sources = []
        for layer in self.decoder.layers:
            a, mlp = layer.self_attn, layer.mlp
            sources.append((a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj))
        params = [t for mods in sources for m in mods for t in (m.weight, m.bias)
                  if t is not None]

        def build() -> list[tuple]:
            fused = []
            for layer, (q, k, v, gate, up) in zip(self.decoder.layers, sources, strict=True):
                w = torch.cat([q.weight, k.weight, v.weight])
                bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
                gu = torch.cat([gate.weight, up.weight])
                fused.append((w, bias, gu, layer.input_layernorm.weight,
                              layer.post_attention_layernorm.weight,
                              layer.input_layernorm.variance_epsilon))
            return fused

        return derived(self, '_fused_cache', params, build)

    def _append_lean(self, prefix: PrefixCache, ids: torch.Tensor,
                     rows: slice | None = None, fused: list[tuple] | None = None) -> PrefixCache:
        """The same computation as the transformers Qwen2/Llama decoder layers (RMSNorm, SiLU
        MLP, rotate-half RoPE), without their per-call cache/mask machinery and with fused
        projections: decoding 8 tokens of a tiny model on CPU is dominated by per-op overhead."""
        dec = self.decoder
        fused = fused or self._fused_layers()
        b, k = ids.shape
        positions = prefix.next_pos[:, None] + torch.arange(k, device=ids.device)   # (B, k)
        h = self.embed(ids)
        cos, sin = dec.rotary_emb(h, positions)                                     # (B, k, hd)
        cos, sin = cos[:, None], sin[:, None]
        s = prefix.mask.shape[1]
        keys = torch.cat([prefix.mask, prefix.mask.new_ones(b, k)], dim=1)        # (B, S + k)
        attn_mask = None
        if k > 1 or not bool(prefix.mask.all()):
            causal = torch.ones(k, s + k, dtype=torch.bool, device=ids.device).tril(s)
            attn_mask = keys[:, None, None, :] & causal[None, None]                # (B,1,k,S+k)
        c = dec.config
        hd = self.head_dim
        n_q, n_kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
        width = h.shape[-1]
        new_kv = []
        for layer, (k_old, v_old), (w_qkv, b_qkv, w_gu, n1, n2, eps) in zip(
                dec.layers, prefix.kv, fused, strict=True):
            x = F.rms_norm(h, (width,), n1, eps)
            qk, vv = F.linear(x, w_qkv, b_qkv).split([n_q + n_kv, n_kv], dim=-1)
            qk = _rope(qk.view(b, k, -1, hd).transpose(1, 2), cos, sin)  # q and k heads at once
            q, kk = qk.split([n_q // hd, n_kv // hd], dim=1)
            kk = torch.cat([k_old, kk], dim=2)
            vv = torch.cat([v_old, vv.view(b, k, -1, hd).transpose(1, 2)], dim=2)
            new_kv.append((kk, vv))
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask,
                                               scale=layer.self_attn.scaling,
                                               enable_gqa=q.shape[1] != kk.shape[1])
            h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, k, -1))
            gate, up = F.linear(F.rms_norm(h, (width,), n2, eps), w_gu).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        h = dec.norm(h)
        return PrefixCache(kv=new_kv, mask=keys, next_pos=prefix.next_pos + k,
                           next_logits=self._logits(h[:, -1], rows), features=prefix.features,
                           summary=prefix.summary, cache=None)

    def generate_latents(self, prefix: PrefixCache, n: int) -> tuple[torch.Tensor, PrefixCache]:
        """Greedy decoding restricted to the latent codes; returns codes (B, n) and the cache
        extended by all n latent tokens (their KV is what the expert attends at inference)."""
        offset, size = self.cfg.latent_offset, self.cfg.tokens.latent_codebook
        rows = slice(offset, offset + size)
        fused = self._fused_layers() if self.lean_decode and n else None
        codes = []
        for _ in range(n):
            code = prefix.next_logits[:, rows].argmax(-1)                           # (B,)
            codes.append(code)
            ids = (code + offset)[:, None]
            prefix = self._append_lean(prefix, ids, rows, fused) if fused is not None \
                else self.append_tokens(prefix, ids, rows)
        if not codes:
            return torch.zeros(prefix.mask.shape[0], 0, dtype=torch.long), prefix
        return torch.stack(codes, dim=1), prefix

    # -- inference fast path (engine.py): the computation of encode_prefix + generate_latents
    # with static shapes, preallocated KV buffers and fewer, larger ops

    @property
    def lean_layers(self) -> bool:
        """The decoder layers are plain pre-norm blocks (RMSNorm, SiLU gated MLP, full
        attention, rotate-half RoPE: Qwen2, Llama, Qwen2.5-VL's text model), which the lean
        passes reimplement; anything else keeps transformers' own forward for the prefix."""
        c = self.decoder.config
        types = getattr(c, 'layer_types', None) or ['full_attention']
        return c.hidden_act == 'silu' and all(t == 'full_attention' for t in types)

    def _prefix_fast(self, images: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor) -> _Inputs:
        """`_prefix` for inference; images may be uint8 in [0, 255]."""
        if images.dtype == torch.uint8:
            images = (images.float() / 255.0).to(self.lm_head.weight.dtype)
        return self._prefix(images, text_ids, text_mask)

    def _rotary(self, h: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B, k) positions -> cos, sin (B, 1, k, hd); A = 3 gives Qwen2.5-VL's mRoPE
        (transformers recomposes the sections into one rotate-half table)."""
        cos, sin = self.decoder.rotary_emb(h, self._pos_arg(positions))
        return cos[:, None], sin[:, None]

    def _lean_weights(self) -> list[tuple]:
        """Per layer (qkv, o, gate|up, down as `Dense`, the two norm weights, eps): the fast
        path's weights, derived once (fused projections, inference layout)."""
        layers = self.decoder.layers

        def sources() -> list[torch.Tensor]:
            return [t for layer in layers for m in (
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                layer.mlp.down_proj) for t in (m.weight, m.bias) if t is not None]

        def build() -> list[tuple]:
            out = []
            for layer in layers:
                a, mlp = layer.self_attn, layer.mlp
                bias = None if a.q_proj.bias is None else \
                    torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                out.append((Dense(torch.cat([a.q_proj.weight, a.k_proj.weight,
                                             a.v_proj.weight]), bias),
                            Dense.of(a.o_proj),
                            Dense(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                            Dense.of(mlp.down_proj), layer.input_layernorm.weight,
                            layer.post_attention_layernorm.weight,
                            layer.input_layernorm.variance_epsilon))
            return out

        return derived(self, '_lean_cache', sources, build)

    def _lean_qkv(self, h: torch.Tensor, w: tuple, cos: torch.Tensor, sin: torch.Tensor,
                  queries: bool = True,
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """h (B, k, D) -> q (B, H, k, hd) (None unless `queries`), rotated k and v
        (B, kvh, k, hd)."""
        qkv, _, _, _, n1, _, eps = w
        b, k, width = h.shape
        hd = self.head_dim
        c = self.decoder.config
        n_q, n_kv = c.num_attention_heads, c.num_key_value_heads
        x = F.rms_norm(h, (width,), n1, eps)
        if not queries:
            kk, v = qkv.outputs(n_q * hd)(x).split([n_kv * hd, n_kv * hd], dim=-1)
            kk = _rope(kk.view(b, k, n_kv, hd).transpose(1, 2), cos, sin)
            return None, kk, v.view(b, k, n_kv, hd).transpose(1, 2)
        qk, v = qkv(x).split([(n_q + n_kv) * hd, n_kv * hd], dim=-1)
        qk = _rope(qk.view(b, k, n_q + n_kv, hd).transpose(1, 2), cos, sin)
        q, kk = qk.split([n_q, n_kv], dim=1)
        return q, kk, v.view(b, k, n_kv, hd).transpose(1, 2)

    def _lean_rest(self, layer: nn.Module, w: tuple, h: torch.Tensor, q: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor | None,
                   is_causal: bool = False) -> torch.Tensor:
        """Attention over (keys, values), output projection and MLP, both residual."""
        _, o_proj, gate_up, down, _, n2, eps = w
        b, k, width = h.shape
        c = self.decoder.config       # head counts from the config: plain ints when traced
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask,
                                           is_causal=is_causal, scale=layer.self_attn.scaling,
                                           enable_gqa=c.num_attention_heads
                                           != c.num_key_value_heads)
        h = h + o_proj(o.transpose(1, 2).reshape(b, k, -1))
        gate, up = gate_up(F.rms_norm(h, (width,), n2, eps)).chunk(2, dim=-1)
        return h + down(F.silu(gate) * up)

    def _latent_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and the latent-code rows of the LM head only: (B, D) -> (B, codebook)."""
        offset, size = self.cfg.latent_offset, self.cfg.tokens.latent_codebook
        bias = self.lm_head.bias
        return F.linear(self.decoder.norm(h), self.lm_head.weight[offset:offset + size],
                        None if bias is None else bias[offset:offset + size])

    def encode_prefix_fast(self, images: torch.Tensor, text_ids: torch.Tensor,
                           text_mask: torch.Tensor, latent_slots: int = 0,
                           static: bool = True) -> PrefixCache:
        """`encode_prefix` for inference. The KV of every layer lands in buffers with
        `latent_slots` free positions after the prefix (a `StaticKV` in `cache`, for
        `decode_latents_static`); `next_logits` holds the latent-code rows only (B, codebook),
        and neither they nor the last layer's output are computed when no latent token follows
        (the expert reads only the keys/values). `static=False` lets it read the mask on the
        host: a prefix without padding then runs plain causal attention (no mask tensor)."""
        if not self.lean_layers:
            raise ValueError(f'{type(self).__name__}: its decoder layers are not plain '
                             'Qwen2/Llama blocks; use encode_prefix')
        p = self._prefix_fast(images, text_ids, text_mask)
        b, s = p.mask.shape
        last = self._last_real(p.mask)
        rows = torch.arange(b, device=last.device)
        fused = self._lean_weights()
        h = p.embeds
        cos, sin = self._rotary(h, p.positions)
        keys_ok = p.mask.bool()
        dense = not static and bool(keys_ok.all())
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        attn_mask = None if dense else keys_ok[:, None, None, :] & causal     # (B,1,S,S)
        kv, logits = [], None
        n_layers = len(self.decoder.layers)
        for i, (layer, f) in enumerate(zip(self.decoder.layers, fused, strict=True)):
            # the last layer's queries serve only the next-token logits
            q, k, v = self._lean_qkv(h, f, cos, sin, queries=i < n_layers - 1 or latent_slots > 0)
            kv.append((k, v))
            if i < n_layers - 1:
                h = self._lean_rest(layer, f, h, q, k, v, attn_mask, is_causal=dense)
            elif latent_slots:
                # only the last real token's output feeds the logits; it attends every
                # real key (those after it are padding)
                h_last = h[rows, last][:, None]                                   # (B,1,D)
                q_last = q[rows, :, last][:, :, None]                       # (B,H,1,hd)
                h_last = self._lean_rest(layer, f, h_last, q_last, k, v,
                                         None if dense else keys_ok[:, None, None, :])
                logits = self._latent_logits(h_last[:, 0])
        cache = None
        if latent_slots:
            cache = StaticKV.allocate(kv, latent_slots)
            kv = cache.views(s)
        return PrefixCache(kv=kv, mask=p.mask.bool(), next_pos=p.positions.amax(dim=(0, 2)) + 1,
                           next_logits=logits, features=p.features, summary=p.summary,
                           cache=cache)

    def decode_latents_static(self, prefix: PrefixCache,
                              n: int) -> tuple[torch.Tensor, PrefixCache]:
        """`generate_latents` with static shapes: the n greedy latent codes and the cache
        extended by their KV, written in place into the preallocated buffers of
        `encode_prefix_fast(..., latent_slots=n)`. Positions and attention masks of all n
        steps are fixed before the loop; no value is read back to the host (no `.item()`,
        no data-dependent shape), so the loop can be compiled or graph-captured as is."""
        b, s = prefix.mask.shape
        dev = prefix.mask.device
        if n == 0:
            return torch.zeros(b, 0, dtype=torch.long, device=dev), prefix
        cache = prefix.cache
        if not isinstance(cache, StaticKV) or cache.capacity < s + n or prefix.next_logits is None:
            raise ValueError(f'decode_latents_static needs encode_prefix_fast(..., '
                             f'latent_slots={n})')
        fused = self._lean_weights()
        offset = self.cfg.latent_offset
        keys_ok = torch.cat([prefix.mask, prefix.mask.new_ones(b, n)], dim=1)     # (B, S+n)
        slot = torch.arange(s + n, device=dev)
        # step j attends the prefix and latent slots 0..j: (n, B, 1, 1, S+n)
        step_masks = keys_ok[None, :, None, None, :] & \
            (slot <= s + torch.arange(n, device=dev)[:, None])[:, None, None, None, :]
        positions = prefix.next_pos[:, None] + torch.arange(n, device=dev)          # (B, n)
        axes = self.position_axes
        cos, sin = self._rotary(cache.keys[0], positions[None].expand(axes, -1, -1))

        codes = torch.empty(b, n, dtype=torch.long, device=dev)
        logits = prefix.next_logits
        layers = self.decoder.layers
        for j in range(n):
            code = logits.argmax(-1)                                                 # (B,)
            codes[:, j] = code
            h = self.embed((code + offset)[:, None])                                 # (B,1,D)
            for i, (layer, f) in enumerate(zip(layers, fused, strict=True)):
                q, k, v = self._lean_qkv(h, f, cos[:, :, j:j + 1], sin[:, :, j:j + 1])
                cache.keys[i][:, :, s + j:s + j + 1] = k
                cache.values[i][:, :, s + j:s + j + 1] = v
                if j == n - 1 and i == len(layers) - 1:
                    break       # the last token's KV is all that is needed from it
                h = self._lean_rest(layer, f, h, q, cache.keys[i][:, :, :s + n],
                                    cache.values[i][:, :, :s + n], step_masks[j])
            else:
                logits = self._latent_logits(h[:, -1])
        return codes, PrefixCache(kv=cache.views(s + n), mask=keys_ok,
                                  next_pos=prefix.next_pos + n, next_logits=None,
                                  features=prefix.features, summary=prefix.summary, cache=cache)


def _pretrained_tokenizer(cfg: VLAConfig, path: Path) -> TextTokenizer:
    file = path / 'tokenizer.json'
    return TextTokenizer.load(file, cfg.backbone.text_vocab, cfg.tokens.latent_codebook,
                              cfg.tokens.fast_vocab)


def build_backbone(cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> Backbone:
    """Random init from config, or weights from the local `backbone.path` (never the hub)."""
    from iflybot_vla_policy.model.tiny_backbone import TinyBackbone
    from iflybot_vla_policy.model.vlm_backbones import Qwen25VLBackbone, SmolVLMBackbone

    if cfg.backbone.path and not Path(cfg.backbone.path).is_dir():
        raise FileNotFoundError(f"config key 'backbone.path': no local model directory "
                                f'{cfg.backbone.path} (weights are never downloaded)')
    kinds = {'tiny': TinyBackbone, 'qwen2_5_vl': Qwen25VLBackbone, 'smolvlm': SmolVLMBackbone}
    return kinds[cfg.backbone.kind](cfg, tokenizer)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100; zero (with graph) when there are none."""
    valid = targets != -100
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), targets[valid])
