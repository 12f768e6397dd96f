"""Tiny, offline stand-ins for the two DeepSeek-OCR checkpoint families, for tests.

* ``build_tiny_ocr2``: a 2 MB, randomly initialised DeepSeek-OCR-2 in the transformers-native
  format (``deepseek_ocr2``), built with the real geometry so the real processor and the real
  ``generate()`` run (see /work/shared/tiny-ocr2-recipe.md). Deterministic: same seed, same bytes.
* ``ScriptedAnswers``: a logits processor that makes that random model say chosen text.
* ``write_remote_code_standin``: a directory that looks like DeepSeek-OCR v1 to the code that loads
  it (``trust_remote_code``, an ``infer()`` with the published signature) and records every call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DeepseekOcr2Config,
    DeepseekOcr2ForConditionalGeneration,
    DeepseekOcr2Processor,
    GenerationConfig,
    LogitsProcessor,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"  # the same string as app.engines.base.END_MARKER
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<image>", "<|grounding|>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"]

# What a chat request looks like to DeepSeek-OCR: the image token, a newline, the instruction.
# `transformers serve` renders every request through the checkpoint's chat template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)

_CORPUS = [
    "Convert the document to markdown.",
    "Free OCR.",
    "Parse the figure.",
    "Describe this image in detail.",
    "OCR this image.",
    "Locate <|ref|>xxxx<|/ref|> in the image.",
    "# Title\n\nSome text, a table | a | b |\n",
    "text title sub_title image image_caption table table_caption equation 0123456789 [[ ]] , "
    "<tr></tr><table></table>",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with DeepSeek's special tokens (bos 0, eos 1, pad 2, ``<image>`` 3).

    Byte-level, so any text encodes; left padding, as batched ``generate()`` needs.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    # Table cells are single, non-special tokens in the real vocabulary too (kept by skip_special_tokens).
    tok.add_tokens([AddedToken(cell, special=False, normalized=False) for cell in ("<td>", "</td>")])
    # DeepSeek's tokenizer prepends bos to every prompt.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=8192,
    )


def build_tiny_ocr2(out_dir: Path) -> Path:
    """Write a tiny DeepSeek-OCR-2 checkpoint (config, weights, processor, tokenizer, chat template).

    The image geometry is the real one (global view 1024 px, tiles 768 px), so prompts have the real
    lengths (257 image tokens for a small page, 144 more per tile); only the widths are tiny.
    Returns ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the weights, hence the files, are the same on every build
    tokenizer = build_tiny_tokenizer()
    processor = DeepseekOcr2Processor(
        image_processor=DeepseekOcr2ImageProcessorPil(),  # defaults are the real checkpoint's values
        tokenizer=tokenizer,
        patch_size=16,
        downsample_ratio=4,
        chat_template=CHAT_TEMPLATE,
    )
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "mlp_layer_types": ["dense", "sparse"],  # required, one per layer
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # image_size/patch_size must stay 1024/16: the model's query tables are fixed at 144 and 256
    # tokens, and the global view must yield more than 144 SAM patches while a tile yields at most 144.
    # No global-attention layers: one would cost a 4096x4096 attention matrix per head.
    sam_config = {
        "hidden_size": 32,
        "output_channels": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 1024,
        "patch_size": 16,
        "window_size": 16,
        "global_attn_indexes": [],
        "mlp_dim": 64,
        "downsample_channels": [32, 64],
    }
    encoder_config = {
        "hidden_size": 64,  # must equal sam downsample_channels[-1]: SAM output feeds the encoder directly
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "vocab_size": 1,  # unused: the vision encoder has no embedding table
    }
    config = DeepseekOcr2Config(
        vision_config={"sam_config": sam_config, "encoder_config": encoder_config},
        text_config=text_config,
        image_token_id=tokenizer.get_vocab()["<image>"],
    )
    model = DeepseekOcr2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)  # also writes tokenizer files and chat_template.jinja
    return out_dir


class ScriptedAnswers(LogitsProcessor):
    """Force ``generate()`` to emit chosen answers, so a random model produces assertable text.

    The k-th sequence this processor sees (counting across ``generate()`` calls, rows of a batch in
    order) is made to emit ``answers[k % len(answers)]`` token by token, then eos; a row past its
    script keeps getting eos (``generate`` itself pads rows that finished). Every other logit is
    ``-inf``, so greedy decoding and the n-gram guard cannot deviate. A new ``generate()`` call is
    recognised because its ids are not the previous step's ids plus one token.
    """

    def __init__(self, answers: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> None:
        if not answers:
            raise ValueError("ScriptedAnswers needs at least one answer")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token")
        self._eos = eos
        self._scripts = [[*tokenizer.encode(a, add_special_tokens=False), eos] for a in answers]
        self._next_sequence = 0  # k of the next row to be assigned a script
        self._rows: list[list[int]] = []  # the script of each row of the current generate() call
        self._prompt_len = 0
        self._previous: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self._continues(input_ids):
            self._prompt_len = input_ids.shape[1]
            self._rows = [
                self._scripts[(self._next_sequence + row) % len(self._scripts)]
                for row in range(input_ids.shape[0])
            ]
            self._next_sequence += input_ids.shape[0]
        self._previous = input_ids.clone()
        step = input_ids.shape[1] - self._prompt_len
        forced = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(self._rows):
            forced[row, script[step] if step < len(script) else self._eos] = 0.0
        return forced  # type: ignore[return-value]

    def _continues(self, input_ids: torch.Tensor) -> bool:
        previous = self._previous
        return (
            previous is not None
            and input_ids.shape[0] == previous.shape[0]
            and input_ids.shape[1] == previous.shape[1] + 1
            and torch.equal(input_ids[:, :-1], previous)
        )


STANDIN_MODELING = '''\
"""Stand-in for DeepSeek-OCR v1's remote code: the published infer() signature, no real model.

Loaded through trust_remote_code; transformers copies this file into HF_MODULES_CACHE, so the
checkpoint directory is found through ``self.name_or_path``, not ``__file__``.
"""

import json
import os

import torch
from PIL import Image
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
{legacy_import}
END = "<｜end▁of▁sentence｜>"


class DeepseekOCRConfig(PretrainedConfig):
    model_type = "deepseek_vl_v2"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class DeepseekOCRForCausalLM(PreTrainedModel):
    config_class = DeepseekOCRConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        # The real model generates, so it has a generation config that infer()'s generate() reads.
        self.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=2)
        self.post_init()

    def forward(self, hidden):
        return self.proj(hidden)

    def infer(self, tokenizer, prompt="", image_file="", output_path="", base_size=1024, image_size=640,
              crop_mode=True, test_compress=False, save_results=False, eval_mode=False):
        os.makedirs(output_path, exist_ok=True)
        with Image.open(image_file) as image:
            width, height = image.size
        call = {{
            "prompt": prompt,
            "image_size_px": [width, height],
            "base_size": base_size,
            "image_size": image_size,
            "crop_mode": crop_mode,
            "eval_mode": eval_mode,
            "save_results": save_results,
            "test_compress": test_compress,
            "max_time": self.generation_config.max_time,
            "dtype": str(self.proj.weight.dtype),
        }}
        with open(os.path.join(self.name_or_path, "calls.jsonl"), "a", encoding="utf-8") as calls:
            calls.write(json.dumps(call) + "\\n")
        outputs = (
            "<|ref|>text<|/ref|><|det|>[[10, 10, 500, 60]]<|/det|>\\n"
            f"standin {{width}}x{{height}} base={{base_size}} image={{image_size}} crop={{crop_mode}}"
            + END
        )
        if not eval_mode:
            print(outputs)  # the published infer() streams to stdout and returns None
            return None
        # As published: the end marker is cut off and the text stripped before it is returned.
        if outputs.endswith(END):
            outputs = outputs[: -len(END)]
        return outputs.strip()
'''

# What the published remote code imports, which transformers >= 4.48 no longer has.
LEGACY_IMPORT = "from transformers.models.llama.modeling_llama import LlamaFlashAttention2  # noqa\n"


def write_remote_code_standin(out_dir: Path, *, legacy_import: bool = False) -> Path:
    """Write a checkpoint directory that loads like DeepSeek-OCR v1 (``trust_remote_code``).

    ``config.json`` has DeepSeek-OCR's ``model_type`` (``deepseek_vl_v2``), ``architectures`` and an
    ``auto_map`` into ``modeling_standin.py``; the tokenizer is the tiny one. The model's
    ``infer()`` appends each call's arguments to ``calls.jsonl`` in ``out_dir`` and, like the
    published one, returns text only with ``eval_mode=True``, with the end marker removed.
    With ``legacy_import`` the module also imports ``LlamaFlashAttention2`` as the published code
    does, so loading it fails on transformers >= 4.48 the way the real checkpoint does.
    Returns ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    modeling = STANDIN_MODELING.format(legacy_import=LEGACY_IMPORT if legacy_import else "")
    (out_dir / "modeling_standin.py").write_text(modeling, encoding="utf-8")
    hidden_size = 8
    config = {
        "model_type": "deepseek_vl_v2",
        "architectures": ["DeepseekOCRForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_standin.DeepseekOCRConfig",
            "AutoModel": "modeling_standin.DeepseekOCRForCausalLM",
        },
        "hidden_size": hidden_size,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = torch.Generator().manual_seed(0)
    save_file(
        {
            "proj.weight": torch.randn(hidden_size, hidden_size, generator=weights),
            "proj.bias": torch.zeros(hidden_size),
        },
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    build_tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
