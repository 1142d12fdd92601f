"""The tiny kit's tokenizers: small BPEs trained in memory, with the real special tokens and chat templates.

The real tokenizers are data files that cannot be downloaded here; these have the real classes (CLIPTokenizer,
Qwen2Tokenizer, LlamaTokenizer), the real added tokens and the real chat templates, so prompts render and
generation stops exactly as with the real models. Only their vocabularies are small.

transformers is imported inside the functions that use it: it takes seconds to import, and this module is imported
by the ``imgrag`` command.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from imgrag.kits.tiny_configs import CLIP_MAX_LENGTH

CLIP_TOY_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]

# --- Qwen tokenizer: a small byte-level BPE with the real Qwen2.5 special tokens ---
QWEN_BPE_VOCAB_SIZE = 400
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen2.5 ships these as added but NOT special tokens (skip_special_tokens=True keeps them).
QWEN_NON_SPECIAL_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN_BPE_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "the image shows a dog in a park",
    "score: 7 / 10. the prompt adherence is good",
    '{"name": "search_images", "arguments": {"query": "cat"}}',
    "You are a helpful assistant. Describe the image and judge its quality.",
    "retrieve reference images then regenerate with ip adapter",
    "yes no true false 0 1 2 3 4 5 6 7 8 9",
]

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the real repository).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-Instruct's tool-calling chat template (tokenizer_config.json of the real repository).
QWEN_LLM_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. \
You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
OMNIGEN_BPE_VOCAB_SIZE = 600
# Llama's <unk> <s> </s> first (the processor drops a chunk's leading id 1, the bos), then Phi-3's chat markers,
# which OmniGen's processor writes around every instruction.
OMNIGEN_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
OMNIGEN_BPE_CORPUS = [
    "Generate an image according to the following instructions",
    "According to these images of a red fox: <img><|image_1|></img>, generate a red fox on a wooden cradle",
    "a photo of a golden retriever puppy sleeping in a cradle beside a red toy rocket",
    "<|diffusion|> low quality, jpeg artifacts, ugly, duplicate, blurry, bad anatomy",
]


def clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer built in memory: the 256 byte symbols, their word-final forms, a few merges."""
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    for left, right in CLIP_TOY_MERGES:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(CLIP_TOY_MERGES), model_max_length=CLIP_MAX_LENGTH)


def qwen_tokenizer(chat_template: str) -> Any:
    """Qwen2Tokenizer over a small byte-level BPE trained here, with Qwen2.5's added tokens."""
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(QWEN_BPE_CORPUS * 20, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", errors="replace", model_max_length=32768,
    )  # fmt: skip
    # transformers 5 spells additional special tokens "extra_special_tokens".
    extra_special = [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]  # pad is set already
    tokenizer.add_special_tokens({"extra_special_tokens": extra_special})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NON_SPECIAL_TOKENS])
    tokenizer.chat_template = chat_template
    return tokenizer


def qwen_generation_config(tokenizer: Any) -> Any:
    """Like the real Qwen2.5 generation_config.json (stop on <|im_end|> or <|endoftext|>), but greedy."""
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext])


def omnigen_tokenizer() -> Any:
    """A LlamaTokenizer over a byte-level BPE trained here, with Phi-3's special tokens (OmniGen's tokenizer is
    Phi-3's, a Llama sentencepiece tokenizer)."""
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=OMNIGEN_BPE_VOCAB_SIZE, special_tokens=OMNIGEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(OMNIGEN_BPE_CORPUS * 10, trainer=trainer)
    return LlamaTokenizer(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                          pad_token="<|endoftext|>")

