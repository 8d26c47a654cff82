"""Text tokenizer of the VLM, extended with latent-action and FAST tokens at fixed ids.

Vocabulary layout (ids): [text tokens ... padded with <unused_k> up to `text_vocab`]
[<lat_0> .. <lat_{C-1}>] [<fast_0> .. <fast_{V-1}>]. The tiny backbone's text part is a
byte-level BPE trained with HF `tokenizers` on instruction and VQA text generated from templates of
our simulator tasks (any text still encodes: unknown words fall back to bytes). The transformers
VLMs use their own `tokenizer.json` from the local model directory, extended the same way.

Chat template: a pretrained instruct VLM was trained on prompts in its chat template (Qwen2.5-VL:
system turn, user turn holding the images then the text, then the assistant's turn), so an
instruction must reach it in that form. The template is read from the model directory
(`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`, as transformers writes
them) and rendered once around a placeholder: `prompt_head` (ids before the user's content,
which the backbone puts before the image tokens) and `prompt_tail` (ids after it, which `encode`
appends to every instruction). It is saved beside `tokenizer.json`, so a Policy keeps it.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

_MAX_FILL = 4096
CHAT_TEMPLATE_FILE = 'chat_template.jinja'
_PLACEHOLDER = '\x00instruction\x00'   # stands for the user's content when rendering
SPECIAL = ('<pad>', '<bos>', '<eos>', '<unk>')
COLOURS = ('red', 'green', 'blue', 'yellow', 'orange', 'purple', 'cyan', 'magenta', 'white',
           'black', 'pink', 'brown', 'gray', 'grey')
OBJECTS = ('cube', 'block', 'box', 'object', 'ball', 'cylinder', 'can', 'bowl', 'plate', 'zone',
           'target', 'square', 'mug', 'drawer', 'handle', 'marker', 'tray', 'bin')
PLACES = ('bowl', 'zone', 'tray', 'plate', 'target', 'square', 'bin', 'goal')
RELATIONS = ('left of', 'right of', 'in front of', 'behind', 'on top of', 'next to', 'above',
             'below', 'near', 'far from', 'closer to the robot than',
             'farther from the robot than')
QUESTIONS = (
    'where is the {c} {o}?', 'which object is {r} the {c2} {o2}?',
    'is the {c} {o} {r} the {c2} {o2}?',
    'what colour is the {o} {r} the {c2} {o2}?', 'how many {o}s are on the table?',
    'what is the position of the {c} {o}?', 'which bin contains the {c} {o}?',
    'is the drawer open?', 'what is the gripper holding?', 'point to the {c} {o}.',
)
ANSWERS = ('yes', 'no', 'the {c} {o}', 'left', 'right', 'front', 'back', 'center', 'open',
           'closed', 'nothing', 'x {i} y {j}', 'row {i} column {j}', '{n}', 'bin {i} {j}')
INSTRUCTIONS = (
    'pick up the {c} {o} and place it in the {c2} {p}', 'put the {c} {o} in the {c2} {p}',
    'place the {c} {o} into the {c2} {p}', 'move the {c} {o} to the {c2} {p}',
    'pick the {c} {o} and put it on the {c2} {p}', 'grasp the {c} {o} and drop it in the {p}',
    'stack the {c} {o} on the {c2} {o2}', 'put the {c} {o} on top of the {c2} {o2}',
    'place the {c} {o} onto the {c2} {o2}', 'stack the {c} cube on top of the {c2} cube',
    'push the {c} {o} to the {c2} {p}', 'slide the {c} {o} towards the {c2} {p}',
    'push the {c} {o} onto the {p}', 'nudge the {c} {o} into the {c2} {p}',
    'open the drawer', 'close the drawer', 'pull the drawer open', 'push the drawer closed',
    'open the {c} drawer', 'close the {c} drawer', 'pull the {c} handle',
    'go to the {c} {o}', 'reach for the {c} {o}', 'lift the {c} {o}', 'touch the {c} {o}',
    'Pick up the {c} {o}.', 'Please put the {c} {o} {r} the {c2} {o2}.',
)


def template_corpus(limit: int = 20000) -> list[str]:
    """Deterministic instruction + VQA sentences covering the simulator's tasks and colours."""
    lines: list[str] = []
    cycle = itertools.cycle
    col, col2 = cycle(COLOURS), cycle(COLOURS[3:] + COLOURS[:3])
    obj, obj2, pla, rel = cycle(OBJECTS), cycle(OBJECTS[5:] + OBJECTS[:5]), cycle(PLACES), \
        cycle(RELATIONS)
    nums = cycle(range(10))
    templates = INSTRUCTIONS + QUESTIONS + ANSWERS
    while len(lines) < limit:
        for t in templates:
            fields = dict(c=next(col), c2=next(col2), o=next(obj), o2=next(obj2), p=next(pla),
                          r=next(rel), i=next(nums), j=next(nums), n=next(nums))
            lines.append(t.format(**fields))
    return lines[:limit]


class TextTokenizer:
    """`tokenizers.Tokenizer` plus the id layout of latent and FAST tokens."""

    def __init__(self, tokenizer: Tokenizer, text_vocab: int, latent_codebook: int,
                 fast_vocab: int, chat_template: str | None = None) -> None:
        self.tok = tokenizer
        self.text_vocab = text_vocab
        self.latent_codebook = latent_codebook
        self.fast_vocab = fast_vocab
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        pad = next((t for t in ('<pad>', '<|endoftext|>', '<end_of_utterance>') if t in vocab),
                   None)
        if pad is None:
            raise ValueError('tokenizer has no padding token (<pad>, <|endoftext|>)')
        self.pad_id = vocab[pad]
        self._extend()
        self.chat_template = chat_template
        self.prompt_head: list[int] = []   # before the images (system turn, user turn opening)
        self.prompt_tail: list[int] = []   # after the instruction (assistant turn opening)
        if chat_template is not None:
            head, tail = _render_around_placeholder(chat_template)
            self.prompt_head, self.prompt_tail = self.encode_text(head), self.encode_text(tail)

    def _extend(self) -> None:
        """Append <unused_k> up to text_vocab, then latent and FAST tokens at fixed ids.

        When the gap to text_vocab is huge (a small tokenizer beside a random-init 150k-vocab VLM
        for shape checks) the ids are only reserved by offset, not written into the file.
        """
        size = self.tok.get_vocab_size(with_added_tokens=True)
        self.extended = size <= self.text_vocab <= size + _MAX_FILL
        if size <= self.text_vocab and not self.extended:
            return
        if size > self.text_vocab:
            if self.tok.token_to_id('<lat_0>') == self.text_vocab or (
                    not self.latent_codebook and self.tok.token_to_id('<fast_0>') is not None):
                self.extended = True
                self._check_layout()
                return
            raise ValueError(f'tokenizer has {size} tokens, more than backbone.text_vocab = '
                             f'{self.text_vocab}')
        fill = [f'<unused_{i}>' for i in range(self.text_vocab - size)]
        latent = [f'<lat_{i}>' for i in range(self.latent_codebook)]
        fast = [f'<fast_{i}>' for i in range(self.fast_vocab)]
        self.tok.add_special_tokens(fill + latent + fast)
        self._check_layout()

    def _check_layout(self) -> None:
        if not self.extended:
            return
        if self.latent_codebook and self.tok.token_to_id('<lat_0>') != self.text_vocab:
            raise ValueError('tokenizer.json: latent token <lat_0> is not at id text_vocab')
        if self.fast_vocab and self.tok.token_to_id('<fast_0>') != (
                self.text_vocab + self.latent_codebook):
            raise ValueError('tokenizer.json: FAST token <fast_0> is not at its expected id')
        total = self.text_vocab + self.latent_codebook + self.fast_vocab
        if self.tok.get_vocab_size(with_added_tokens=True) != total:
            raise ValueError(f'tokenizer.json: vocabulary size '
                             f'{self.tok.get_vocab_size(with_added_tokens=True)} != {total}')

    @classmethod
    def train(cls, text_vocab: int, latent_codebook: int, fast_vocab: int,
              corpus: list[str] | None = None) -> TextTokenizer:
        """Byte-level BPE on the template corpus (deterministic, ~1 s)."""
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=min(text_vocab, 4096), special_tokens=list(SPECIAL),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus or template_corpus(), trainer=trainer)
        return cls(tok, text_vocab, latent_codebook, fast_vocab)

    @classmethod
    def load(cls, path: Path, text_vocab: int, latent_codebook: int,
             fast_vocab: int) -> TextTokenizer:
        """tokenizer.json, with the chat template found beside it (if any)."""
        if not path.is_file():
            raise FileNotFoundError(f'tokenizer not found: {path}')
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f'{path}: cannot parse tokenizer: {err}') from None
        template, source = read_chat_template(path.parent)
        try:
            return cls(tok, text_vocab, latent_codebook, fast_vocab, template)
        except ValueError as err:
            raise ValueError(f'{source or path}: {err}') from None

    def save(self, path: Path) -> None:
        """tokenizer.json, and the chat template beside it (removed when there is none, so
        the directory never pairs this tokenizer with another one's template)."""
        self.tok.save(str(path))
        template_file = path.parent / CHAT_TEMPLATE_FILE
        if self.chat_template is not None:
            template_file.write_text(self.chat_template)
        elif template_file.is_file():
            template_file.unlink()

    def encode(self, text: str, max_len: int) -> tuple[list[int], list[int]]:
        """Ids padded/truncated to max_len, and the mask (1 = real token). With a chat template
        the instruction is followed by `prompt_tail`, which truncation never cuts."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.chat_template is not None:
            keep = max_len - len(self.prompt_tail)
            if keep < 1:
                raise ValueError(f'backbone.max_text_tokens = {max_len} leaves no room for the '
                                 f"instruction before the chat template's "
                                 f'{len(self.prompt_tail)} closing tokens')
            ids = ids[:keep] + self.prompt_tail
        ids = ids[:max_len]
        n = len(ids)
        return ids + [self.pad_id] * (max_len - n), [1] * n + [0] * (max_len - n)

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.text_vocab])

    def latent_id(self, code: int) -> int:
        return self.text_vocab + code

    def fast_id(self, token: int) -> int:
        return self.text_vocab + self.latent_codebook + token

    def summary(self) -> str:
        return json.dumps({'text_vocab': self.text_vocab, 'latent': self.latent_codebook,
                           'fast': self.fast_vocab})


def read_chat_template(directory: Path) -> tuple[str | None, Path | None]:
    """The chat template of a model directory in any of the places transformers keeps it
    (`chat_template.jinja` since 4.5x, `chat_template.json` of processors, or the
    `chat_template` key of `tokenizer_config.json`), and the file it came from."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(), jinja
    for name in ('chat_template.json', 'tokenizer_config.json'):
        file = directory / name
        if not file.is_file():
            continue
        try:
            template = json.loads(file.read_text()).get('chat_template')
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f'{file}: cannot read the chat template: {err}') from None
        if isinstance(template, list):    # named templates: [{'name': ..., 'template': ...}]
            template = next((t.get('template') for t in template
                             if isinstance(t, dict) and t.get('name') == 'default'), None)
        if isinstance(template, str):
            return template, file
    return None, None


def _render_around_placeholder(template: str) -> tuple[str, str]:
    """The text a chat template puts before and after one user turn's content, with the
    assistant's turn opened (what generation, and so our action tokens, follow)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    last: Exception | None = None
    for content in ([{'type': 'text', 'text': _PLACEHOLDER}], _PLACEHOLDER):
        try:
            rendered = render_jinja_template([[{'role': 'user', 'content': content}]],
                                             chat_template=template,
                                             add_generation_prompt=True)[0][0]
        except Exception as err:  # jinja errors of a template that wants the other form
            last = err
            continue
        if rendered.count(_PLACEHOLDER) == 1:
            head, tail = rendered.split(_PLACEHOLDER)
            return head, tail
    raise ValueError('chat template does not render one user message with text content'
                     + (f': {last}' if last else ''))
