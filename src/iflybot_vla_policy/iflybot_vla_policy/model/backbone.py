"""The VLM backbone: one interface, three implementations.

Interface (`Backbone`):
- `forward_train(images, text_ids, text_mask, suffix_ids, suffix_mask)`: one causal pass over
  [image tokens, instruction, suffix tokens (latent + FAST, or a VQA answer)] returning the
  logits that predict each suffix token and the per-layer KV (with gradients) for the expert.
- `encode_prefix(images, text_ids, text_mask) -> PrefixCache`: images + instruction once; the
  per-layer KV cache, its key mask and the logits for the next token.
- `append_tokens(prefix, ids)` / `generate_latents(prefix, n, ...)`: extend the cache.

Implementations: `TinyBackbone` (a transformers Qwen2 decoder built from config, fed by our conv
vision tower), `Qwen25VLBackbone` (the paper's Qwen2.5-VL) and `SmolVLMBackbone`
(Idefics3/SmolVLM). Each is built from config (random init) or loaded from a local directory with
`local_files_only=True`: nothing is ever fetched from the hub.

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
from iflybot_vla_policy.model.text_tokenizer import TextTokenizer
from iflybot_vla_policy.model.vision import ConvVisionTower

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, kv_heads, S, head_dim) each


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
        axes = 3 if isinstance(self, Qwen25VLBackbone) else 1
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
        axes = 3 if isinstance(self, Qwen25VLBackbone) else 1
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


@dataclass
class StaticKV:
    """Preallocated per-layer key/value buffers (B, kv_heads, capacity, head_dim): the prefix
    is written once, each decoded token into its own fixed slot."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @classmethod
    def allocate(cls, kv: KV, extra: int) -> StaticKV:
        """Buffers for the prefix `kv` plus `extra` slots, zeroed (a masked slot must hold a
        finite value: attention weights of 0 times NaN would still be NaN)."""
        keys, values = [], []
        for k, v in kv:
            b, h, s, d = k.shape
            kb, vb = k.new_zeros(b, h, s + extra, d), v.new_zeros(b, h, s + extra, d)
            kb[:, :, :s] = k
            vb[:, :, :s] = v
            keys.append(kb)
            values.append(vb)
        return cls(keys, values)

    def views(self, length: int) -> KV:
        return [(k[:, :, :length], v[:, :, :length])
                for k, v in zip(self.keys, self.values, strict=True)]


# ---------------------------------------------------------------------------------------------
# tiny: Qwen2 decoder from config + conv vision tower


class TinyBackbone(Backbone):
    """Qwen2 decoder LM built from config; image tokens come from `ConvVisionTower`."""

    lean_decode = True

    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__(cfg)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        b = cfg.backbone
        path = Path(b.path) if b.path else None
        if tokenizer is None and path is not None:
            tokenizer = _pretrained_tokenizer(cfg, path)
        self.tokenizer = tokenizer or TextTokenizer.train(
            b.text_vocab, cfg.tokens.latent_codebook, cfg.tokens.fast_vocab)
        lm_cfg = Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=b.hidden, num_hidden_layers=b.layers,
            num_attention_heads=b.heads, num_key_value_heads=b.kv_heads, head_dim=b.head_dim,
            intermediate_size=b.intermediate, max_position_embeddings=2048,
            rope_parameters={'rope_type': 'default', 'rope_theta': b.rope_theta},
            tie_word_embeddings=b.tie_embeddings, pad_token_id=self.tokenizer.pad_id)
        lm_cfg._attn_implementation = 'sdpa'
        if path is not None:
            lm = Qwen2ForCausalLM.from_pretrained(path, local_files_only=True,
                                                  attn_implementation='sdpa')
            _check_loaded(lm.config, lm_cfg, path)
        else:
            lm = Qwen2ForCausalLM(lm_cfg)
        object.__setattr__(self, 'hf', lm)  # for save_pretrained; not a second submodule
        self.decoder, self.lm_head = lm.model, lm.lm_head
        self.lean_decode = lm_cfg.hidden_act == 'silu'
        self.vision = ConvVisionTower(b.vision, cfg.image_size, len(cfg.cameras), b.hidden,
                                      b.text_vocab)
        if path is not None:
            _load_extra(self.vision, path / VISION_FILE)

    def checkpointed_modules(self) -> list[nn.Module]:
        return [*super().checkpointed_modules(), *self.vision.stages]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        super().set_activation_checkpointing(enabled)
        self.vision.checkpointing = enabled

    def save_pretrained(self, directory: str | Path) -> Path:
        """A local model directory that `backbone.path` loads: the Qwen2 LM in transformers
        format, the conv tower and the tokenizer."""
        from safetensors.torch import save_file

        d = super().save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.vision.state_dict().items()},
                  str(d / VISION_FILE))
        return d

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        tokens, summary = self.vision(images, text_ids, text_mask)   # (B, N, D), (B, D)
        embeds = torch.cat([tokens.to(self.lm_head.weight.dtype), self.embed(text_ids)], dim=1)
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.long,
                                     device=text_mask.device), text_mask.long()], dim=1)
        return _Inputs(embeds, mask, _positions_1d(mask), tokens, summary)

    def _prefix_fast(self, images: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor) -> _Inputs:
        tokens, summary = self.vision.forward_fast(images, text_ids, text_mask)
        embeds = torch.cat([tokens.to(self.lm_head.weight.dtype), self.embed(text_ids)], dim=1)
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.long,
                                     device=text_mask.device), text_mask.long()], dim=1)
        return _Inputs(embeds, mask, _positions_1d(mask), tokens, summary)


# ---------------------------------------------------------------------------------------------
# transformers VLM families


def _pretrained_tokenizer(cfg: VLAConfig, path: Path) -> TextTokenizer:
    file = path / 'tokenizer.json'
    return TextTokenizer.load(file, cfg.backbone.text_vocab, cfg.tokens.latent_codebook,
                              cfg.tokens.fast_vocab)


VISION_FILE = 'vision.safetensors'


def _check_loaded(loaded, expected, path: Path) -> None:
    """A local tiny LM must have the shapes the config asks for; name the first mismatch."""
    pairs = (('hidden_size', 'backbone.hidden'), ('num_hidden_layers', 'backbone.layers'),
             ('num_attention_heads', 'backbone.heads'),
             ('num_key_value_heads', 'backbone.kv_heads'),
             ('intermediate_size', 'backbone.intermediate'), ('vocab_size', 'vocab size'))
    for attr, key in pairs:
        if getattr(loaded, attr) != getattr(expected, attr):
            raise ValueError(f'{path}/config.json: {attr} = {getattr(loaded, attr)} but config '
                             f"key '{key}' asks for {getattr(expected, attr)}")


def _load_extra(module: nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f'local model directory is missing {file}')
    state = load_file(str(file))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ValueError(f"{file}: {'missing' if missing else 'unexpected'} key '{key}'")


def _from_local_dir(model_cls, cfg: VLAConfig, path: Path, vision_pairs) -> nn.Module:
    """A transformers VLM from a local directory in fp32, refused when its shapes differ from
    the config (config.yaml must describe what runs, and latent/FAST ids follow text_vocab) or
    when any weight is missing (transformers would silently leave it randomly initialised)."""
    model, info = model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                            attn_implementation='sdpa',
                                            output_loading_info=True)
    b, text = cfg.backbone, model.config.text_config
    pairs = [(f'text_config.{a}', getattr(text, a), key, want) for a, key, want in (
        ('hidden_size', 'backbone.hidden', b.hidden),
        ('num_hidden_layers', 'backbone.layers', b.layers),
        ('num_attention_heads', 'backbone.heads', b.heads),
        ('num_key_value_heads', 'backbone.kv_heads', b.kv_heads),
        ('intermediate_size', 'backbone.intermediate', b.intermediate))]
    # a release has text_vocab rows; a directory we saved also has the latent and FAST rows
    if text.vocab_size != cfg.vocab_size:
        pairs.append(('text_config.vocab_size', text.vocab_size, 'backbone.text_vocab',
                      b.text_vocab))
    for attr, have, key, want in pairs + vision_pairs(model.config):
        if have != want:
            raise ValueError(f"{path}/config.json: {attr} = {have} but config key '{key}' asks "
                             f'for {want}')
    missing = sorted(set(info['missing_keys']) | set(info['mismatched_keys']))
    if missing:
        raise ValueError(f"{path}: no weights for '{missing[0]}' ({len(missing)} tensors in "
                         f'all): not a {model_cls.__name__} checkpoint?')
    return model


def _template_tokenizer(cfg: VLAConfig) -> TextTokenizer:
    """Random-init VLMs (tests, shape checks) still need a text tokenizer: ours, in their range."""
    return TextTokenizer.train(cfg.backbone.text_vocab, cfg.tokens.latent_codebook,
                               cfg.tokens.fast_vocab)


class Qwen25VLBackbone(Backbone):
    """Qwen2.5-VL (the paper's VLM). Images are patchified by hand (the processor needs
    torchvision) and get 3-D mRoPE positions; the text model runs on our embeddings."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics, as the processor
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__(cfg)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        b = cfg.backbone
        if b.path:
            path = Path(b.path)
            model = _from_local_dir(Qwen2_5_VLForConditionalGeneration, cfg, path, lambda c: [
                ('vision_config.patch_size', c.vision_config.patch_size, 'backbone.patch_size',
                 b.patch_size),
                ('vision_config.spatial_merge_size', c.vision_config.spatial_merge_size,
                 'backbone.spatial_merge', b.spatial_merge)])
            self.tokenizer = tokenizer or _pretrained_tokenizer(cfg, path)
            model.resize_token_embeddings(cfg.vocab_size)   # + latent and FAST rows
        else:
            top = b.text_vocab - 1  # placeholder ids at the top of the text range (unused ids)
            mrope = [b.head_dim // 8, b.head_dim * 3 // 16, b.head_dim * 3 // 16]
            mcfg = Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=cfg.vocab_size, hidden_size=b.hidden, num_hidden_layers=b.layers,
                    num_attention_heads=b.heads, num_key_value_heads=b.kv_heads,
                    intermediate_size=b.intermediate, max_position_embeddings=32768,
                    rope_parameters={'rope_type': 'default', 'rope_theta': b.rope_theta,
                                     'mrope_section': mrope},
                    tie_word_embeddings=b.tie_embeddings, bos_token_id=None,
                    eos_token_id=None),
                vision_config=dict(
                    depth=b.vision_depth, hidden_size=b.vision_hidden, num_heads=b.vision_heads,
                    intermediate_size=b.vision_intermediate, patch_size=b.patch_size,
                    spatial_merge_size=b.spatial_merge, temporal_patch_size=2,
                    out_hidden_size=b.hidden, window_size=112,
                    fullatt_block_indexes=list(range(b.vision_depth)) if b.vision_depth < 8
                    else [7, 15, 23, 31][:b.vision_depth // 8]),
                image_token_id=top, vision_start_token_id=top - 2, vision_end_token_id=top - 1,
                video_token_id=top - 3, tie_word_embeddings=b.tie_embeddings,
                bos_token_id=None, eos_token_id=None)
            mcfg._attn_implementation = 'sdpa'
            model = Qwen2_5_VLForConditionalGeneration(mcfg)
            self.tokenizer = tokenizer or _template_tokenizer(cfg)
        object.__setattr__(self, 'hf', model)  # for save_pretrained; not a second submodule
        self.vlm = model.model
        self.decoder, self.lm_head = model.model.language_model, model.lm_head
        mc = model.config
        self.image_token_id = mc.image_token_id
        self.vision_start_id = mc.vision_start_token_id
        self.vision_end_id = mc.vision_end_token_id
        self.patch = mc.vision_config.patch_size
        self.merge = mc.vision_config.spatial_merge_size
        self.temporal = mc.vision_config.temporal_patch_size
        self.register_buffer('mean', torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def patchify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> flat patches (N * gh * gw, 3 * T * p * p), grid_thw (N, 3),
        in the layout of Qwen2VLImageProcessor (a still image repeated over T frames)."""
        n, c, h, w = images.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = ((images - self.mean) / self.std)[:, None].expand(n, t, c, h, w)
        x = x.reshape(n, 1, t, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        flat = x.reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * n, device=images.device)
        return flat, grid

    def prompt_ids(self, text_ids: torch.Tensor, n_cam: int, n_img: int) -> torch.Tensor:
        """(B, T) encoded instructions -> (B, S) the token sequence the chat template and the
        processor make: [prompt head][<|vision_start|> n_img x <|image_pad|> <|vision_end|>]
        per camera [instruction + prompt tail]."""
        b = text_ids.shape[0]
        block = [self.vision_start_id] + [self.image_token_id] * n_img + [self.vision_end_id]
        head = torch.tensor(self.tokenizer.prompt_head + block * n_cam, dtype=torch.long,
                            device=text_ids.device).expand(b, -1)
        return torch.cat([head, text_ids], dim=1)

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        b, n_cam, _, h, w = images.shape
        flat, grid = self.patchify(images.flatten(0, 1).to(self.mean.dtype))
        feats = self.vlm.get_image_features(flat.to(self.lm_head.weight.dtype),
                                            image_grid_thw=grid).pooler_output
        feats = torch.cat(list(feats), 0).view(b, n_cam, -1, self.hidden)       # (B, cam, n, D)
        n_img = feats.shape[2]
        gh, gw = h // self.patch // self.merge, w // self.patch // self.merge
        ids = self.prompt_ids(text_ids, n_cam, n_img)
        n_head = len(self.tokenizer.prompt_head)
        embeds = self.embed(ids)
        is_img = ids == self.image_token_id
        # under autocast the vision tower returns bf16 while the embedding table stays fp32
        embeds = embeds.masked_scatter(is_img[..., None],
                                       feats.reshape(-1, self.hidden).to(embeds.dtype))
        mask = torch.cat([torch.ones_like(ids[:, :ids.shape[1] - text_ids.shape[1]]),
                          text_mask.long()], dim=1)
        # mRoPE: the prompt head 1-D, per camera [start][t=0, row, col grid][end], text 1-D
        pos = [torch.arange(n_head, device=ids.device).expand(3, -1)]
        cur = n_head
        rows = torch.arange(gh, device=ids.device).repeat_interleave(gw)
        cols = torch.arange(gw, device=ids.device).repeat(gh)
        for _ in range(n_cam):
            pos.append(torch.full((3, 1), cur, device=ids.device))
            cur += 1
            pos.append(torch.stack([torch.zeros_like(rows), rows, cols]) + cur)
            cur += max(gh, gw)
            pos.append(torch.full((3, 1), cur, device=ids.device))
            cur += 1
        img_pos = torch.cat(pos, dim=1)[:, None].expand(3, b, -1)                 # (3, B, Si)
        txt_pos = cur + (text_mask.long().cumsum(-1) - 1).clamp(min=0)            # (B, T)
        positions = torch.cat([img_pos, txt_pos[None].expand(3, -1, -1)], dim=-1)
        features = feats.flatten(1, 2) if self.cfg.expert.direct_vision else None
        summary = feats.mean(dim=(1, 2)) if self.cfg.expert.direct_vision else None
        return _Inputs(embeds, mask, positions, features, summary)


class SmolVLMBackbone(Backbone):
    """SmolVLM / Idefics3: SigLIP vision encoder + pixel-shuffle connector + Llama decoder."""

    lean_decode = True

    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__(cfg)
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        b = cfg.backbone
        if b.path:
            path = Path(b.path)
            model = _from_local_dir(Idefics3ForConditionalGeneration, cfg, path, lambda c: [
                ('vision_config.patch_size', c.vision_config.patch_size, 'backbone.patch_size',
                 b.patch_size),
                ('scale_factor', c.scale_factor, 'backbone.spatial_merge', b.spatial_merge)])
            self.tokenizer = tokenizer or _pretrained_tokenizer(cfg, path)
            model.resize_token_embeddings(cfg.vocab_size)   # + latent and FAST rows
        else:
            mcfg = Idefics3Config(
                text_config=dict(
                    model_type='llama', vocab_size=cfg.vocab_size, hidden_size=b.hidden,
                    num_hidden_layers=b.layers, num_attention_heads=b.heads,
                    num_key_value_heads=b.kv_heads, head_dim=b.head_dim,
                    intermediate_size=b.intermediate, max_position_embeddings=8192,
                    rope_parameters={'rope_type': 'default', 'rope_theta': b.rope_theta},
                    tie_word_embeddings=b.tie_embeddings),
                vision_config=dict(
                    hidden_size=b.vision_hidden, num_hidden_layers=b.vision_depth,
                    num_attention_heads=b.vision_heads, intermediate_size=b.vision_intermediate,
                    patch_size=b.patch_size, image_size=cfg.image_size),
                scale_factor=b.spatial_merge, image_token_id=b.text_vocab - 1,
                tie_word_embeddings=b.tie_embeddings)
            mcfg._attn_implementation = 'sdpa'
            model = Idefics3ForConditionalGeneration(mcfg)
            self.tokenizer = tokenizer or _template_tokenizer(cfg)
        object.__setattr__(self, 'hf', model)  # for save_pretrained; not a second submodule
        self.vlm = model.model
        self.decoder, self.lm_head = model.model.text_model, model.lm_head
        self.lean_decode = self.decoder.config.hidden_act == 'silu'
        self.image_token_id = model.config.image_token_id

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        b, n_cam = images.shape[:2]
        x = images.flatten(0, 1).to(self.lm_head.weight.dtype) * 2 - 1         # SigLIP: [-1, 1]
        vis = self.vlm.vision_model(pixel_values=x).last_hidden_state
        feats = self.vlm.connector(vis).view(b, n_cam, -1, self.hidden)         # (B, cam, n, D)
        n_img = feats.shape[2]
        head = torch.tensor(self.tokenizer.prompt_head, dtype=torch.long,
                            device=text_ids.device).expand(b, -1)
        text = self.embed(torch.cat([head, text_ids], dim=1))
        n_head = head.shape[1]
        # [chat template head][image tokens][instruction + template tail]
        embeds = torch.cat([text[:, :n_head], feats.flatten(1, 2).to(text.dtype),
                            text[:, n_head:]], dim=1)
        mask = torch.cat([torch.ones(b, n_head + n_cam * n_img, dtype=torch.long,
                                     device=text_ids.device), text_mask.long()], dim=1)
        features = feats.flatten(1, 2) if self.cfg.expert.direct_vision else None
        summary = feats.mean(dim=(1, 2)) if self.cfg.expert.direct_vision else None
        return _Inputs(embeds, mask, _positions_1d(mask), features, summary)


_KINDS = {'tiny': TinyBackbone, 'qwen2_5_vl': Qwen25VLBackbone, 'smolvlm': SmolVLMBackbone}


def build_backbone(cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> Backbone:
    """Random init from config, or weights from the local `backbone.path` (never the hub)."""
    if cfg.backbone.path and not Path(cfg.backbone.path).is_dir():
        raise FileNotFoundError(f"config key 'backbone.path': no local model directory "
                                f'{cfg.backbone.path} (weights are never downloaded)')
    return _KINDS[cfg.backbone.kind](cfg, tokenizer)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100; zero (with graph) when there are none."""
    valid = targets != -100
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), targets[valid])
