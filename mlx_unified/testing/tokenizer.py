"""A small Gemma 4 tokenizer for test checkpoints.

`write_tokenizer(path)` writes the tokenizer files a released Gemma 4 unified checkpoint carries
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`, `processor_config.json`), in Gemma's own
format (BPE with byte fallback, `▁` for spaces) but with a vocabulary of a few hundred ids learned from a
short built-in text: any text encodes (unknown characters fall back to bytes) and the tiny test model's
embedding stays small. Every Gemma 4 special token is present; the chat template is
Gemma 4's own (see `GEMMA4_CHAT_TEMPLATE` below for its source).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GemmaTokenizer

# Learned pieces on top of the specials and the 256 byte-fallback pieces.
BPE_VOCAB_SIZE = 400

# Order fixes the ids: pad, eos and bos get 0, 1, 2 as in the released tokenizer.
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
# Named the way transformers' Gemma 4 conversion names them (`extra_special_tokens`), which is what gives the
# loaded tokenizer its `image_token`, `boi_token`, ... attributes and their `*_id` twins.
EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "video_token": "<|video|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}

# Training text: enough English, digits and punctuation that common words become single tokens; bytes
# cover everything else.
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a red chair.
Describe this image. What is in this picture? Transcribe the audio. What does the speaker say?
Summarize the video in one sentence. The man is walking along the beach at sunset.
user model system assistant tool thought call response declaration description parameters
Hello, world! How are you today? I am fine, thank you. Please answer in English.
0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 00:00 00:01 00:59 01:00 12:30
one two three four five six seven eight nine ten first second third last
the of and to in is that it for on with as was at by this from are be have
image audio video frame sound speech music color shape size left right top bottom
def main(): return x + y * z / (a - b) == [1, 2, 3] {"key": "value"} <tag> </tag>
Le renard brun. Der schnelle Fuchs. El zorro marron. Il gatto nero.
"""


def _train_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """BPE pieces and merges learned on the built-in text, in Gemma's spelling (`▁` for a space)."""
    trainer_tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # Merges stay inside words, as in the released vocabulary.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False)
    trainer_tokenizer.train_from_iterator(_TRAINING_TEXT.strip().splitlines(), trainer=trainer)
    state = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = sorted(state["vocab"], key=state["vocab"].get)
    return pieces, [tuple(merge) for merge in state["merges"]]


def build_tokenizer() -> GemmaTokenizer:
    """The tokenizer itself: specials first (pad 0, eos 1, bos 2), then the 256 byte-fallback pieces."""
    pieces, merges = _train_merges()
    specials = list(SPECIAL_TOKENS.values()) + list(EXTRA_SPECIAL_TOKENS.values())
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    vocab: dict[str, int] = {}
    for piece in specials + byte_pieces + pieces:
        vocab.setdefault(piece, len(vocab))
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
        # The template writes `<bos>` itself.
        add_bos_token=False,
        add_eos_token=False,
        padding_side="left",
        model_max_length=262144,
        chat_template=GEMMA4_CHAT_TEMPLATE,
    )


def write_tokenizer(path: str | Path) -> dict[str, int]:
    """Write the tokenizer files into checkpoint folder `path`.

    Returns the ids config.json needs: `pad_token_id`, `eos_token_id`, `bos_token_id`, `boi_token_id`,
    `eoi_token_id`, `image_token_id`, `video_token_id`, `boa_token_id`, `eoa_token_index` (the config's
    name for the end-of-audio id), `audio_token_id`, `eot_token_id` (`<turn|>`) and `vocab_size`.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(folder))
    (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))

    token_id = tokenizer.convert_tokens_to_ids
    return {
        "pad_token_id": token_id(SPECIAL_TOKENS["pad_token"]),
        "eos_token_id": token_id(SPECIAL_TOKENS["eos_token"]),
        "bos_token_id": token_id(SPECIAL_TOKENS["bos_token"]),
        "boi_token_id": token_id(EXTRA_SPECIAL_TOKENS["boi_token"]),
        "eoi_token_id": token_id(EXTRA_SPECIAL_TOKENS["eoi_token"]),
        "image_token_id": token_id(EXTRA_SPECIAL_TOKENS["image_token"]),
        "video_token_id": token_id(EXTRA_SPECIAL_TOKENS["video_token"]),
        "boa_token_id": token_id(EXTRA_SPECIAL_TOKENS["boa_token"]),
        "eoa_token_index": token_id(EXTRA_SPECIAL_TOKENS["eoa_token"]),
        "audio_token_id": token_id(EXTRA_SPECIAL_TOKENS["audio_token"]),
        "eot_token_id": token_id(EXTRA_SPECIAL_TOKENS["eot_token"]),
        "vocab_size": len(tokenizer),
    }


# What `AutoProcessor` needs to build the reference `Gemma4UnifiedProcessor`: the three media processors'
# settings as in the released checkpoint (image budget 280, video frames at 1 fps with budget 70).
PROCESSOR_CONFIG = {
    "processor_class": "Gemma4UnifiedProcessor",
    "image_seq_length": 280,
    "audio_seq_length": 750,
    "audio_ms_per_token": 40,
    "feature_extractor": {
        "feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor",
        "feature_size": 640,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "audio_samples_per_token": 640,
    },
    "image_processor": {
        "image_processor_type": "Gemma4UnifiedImageProcessor",
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "max_soft_tokens": 280,
    },
    "video_processor": {
        "video_processor_type": "Gemma4UnifiedVideoProcessor",
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "max_soft_tokens": 70,
        "do_sample_frames": True,
        "num_frames": None,
        "fps": 1,
    },
}

# Gemma 4's chat template, verbatim (12,133 characters). Source: `models/templates/gemma4.jinja` in
# github.com/ggml-org/llama.cpp (stored commit 75f1ba7389067a9f90082515e124c377a1e104b2), llama.cpp's copy
# of the `chat_template.jinja` Google ships with the Gemma 4 instruction-tuned checkpoints. Not to be
# edited: a real checkpoint brings its own copy.
GEMMA4_CHAT_TEMPLATE = r"""{%- macro format_parameters(properties, required) -%}
    {%- set standard_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
    {%- set ns = namespace(found_first=false) -%}
    {%- for key, value in properties | dictsort -%}
        {%- set add_comma = false -%}
        {%- if key not in standard_keys -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {{ key }}:{
            {%- if value['description'] -%}
                description:<|"|>{{ value['description'] }}<|"|>
                {%- set add_comma = true -%}
            {%- endif -%}
            {%- if value['nullable'] %}
                {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                nullable:true
            {%- endif -%}
            {%- set value_type = value['type'] if value['type'] is string else value['type'][0] -%}
            {%- if value_type | upper == 'STRING' -%}
                {%- if value['enum'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    enum:{{ format_argument(value['enum']) }}
                {%- endif -%}
            {%- elif value_type | upper == 'OBJECT' -%}
                ,properties:{
                {%- if value['properties'] is defined and value['properties'] is mapping -%}
                    {{- format_parameters(value['properties'], value['required'] | default([])) -}}
                {%- elif value is mapping -%}
                    {{- format_parameters(value, value['required'] | default([])) -}}
                {%- endif -%}
                }
                {%- if value['required'] -%}
                    ,required:[
                    {%- for item in value['required'] | default([]) -%}
                        <|"|>{{- item -}}<|"|>
                        {%- if not loop.last %},{% endif -%}
                    {%- endfor -%}
                    ]
                {%- endif -%}
            {%- elif value_type | upper == 'ARRAY' -%}
                {%- if value['items'] is mapping and value['items'] -%}
                    ,items:{
                    {%- set ns_items = namespace(found_first=false) -%}
                    {%- for item_key, item_value in value['items'] | dictsort -%}
                        {%- if item_value is not none -%}
                            {%- if ns_items.found_first %},{% endif -%}
                            {%- set ns_items.found_first = true -%}
                            {%- if item_key == 'properties' -%}
                                properties:{
                                {%- if item_value is mapping -%}
                                    {{- format_parameters(item_value, value['items']['required'] | default([])) -}}
                                {%- endif -%}
                                }
                            {%- elif item_key == 'required' -%}
                                required:[
                                {%- for req_item in item_value -%}
                                    <|"|>{{- req_item -}}<|"|>
                                    {%- if not loop.last %},{% endif -%}
                                {%- endfor -%}
                                ]
                            {%- elif item_key == 'type' -%}
                                {%- if item_value is string -%}
                                    type:{{ format_argument(item_value | upper) }}
                                {%- else -%}
                                    type:{{ format_argument(item_value | map('upper') | list) }}
                                {%- endif -%}
                            {%- else -%}
                                {{ item_key }}:{{ format_argument(item_value) }}
                            {%- endif -%}
                        {%- endif -%}
                    {%- endfor -%}
                    }
                {%- endif -%}
            {%- endif -%}
            {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
            type:<|"|>{{ value_type | upper }}<|"|>}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool_data) -%}
    declaration:{{- tool_data['function']['name'] -}}{description:<|"|>{{- tool_data['function']['description'] -}}<|"|>
    {%- set params = tool_data['function']['parameters'] -%}
    {%- if params -%}
        ,parameters:{
        {%- if params['properties'] -%}
            properties:{ {{- format_parameters(params['properties'], params['required']) -}} },
        {%- endif -%}
        {%- if params['required'] -%}
            required:[
            {%- for item in params['required'] -%}
                <|"|>{{- item -}}<|"|>
                {{- ',' if not loop.last -}}
            {%- endfor -%}
            ],
        {%- endif -%}
        {%- if params['type'] -%}
            type:<|"|>{{- params['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    {%- if 'response' in tool_data['function'] -%}
        {%- set response_declaration = tool_data['function']['response'] -%}
        ,response:{
        {%- if response_declaration['description'] -%}
            description:<|"|>{{- response_declaration['description'] -}}<|"|>,
        {%- endif -%}
        {%- if response_declaration['type'] | upper == 'OBJECT' -%}
            type:<|"|>{{- response_declaration['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    }
{%- endmacro -%}
{%- macro format_argument(argument, escape_keys=True) -%}
    {%- if argument is string -%}
        {{- '<|"|>' + argument + '<|"|>' -}}
    {%- elif argument is boolean -%}
        {{- 'true' if argument else 'false' -}}
    {%- elif argument is mapping -%}
        {{- '{' -}}
        {%- set ns = namespace(found_first=false) -%}
        {%- for key, value in argument | dictsort -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {%- if escape_keys -%}
                {{- '<|"|>' + key + '<|"|>' -}}
            {%- else -%}
                {{- key -}}
            {%- endif -%}
            :{{- format_argument(value, escape_keys=escape_keys) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif argument is sequence -%}
        {{- '[' -}}
        {%- for item in argument -%}
            {{- format_argument(item, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- argument -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- set ns = namespace(prev_message_type=None) -%}
{%- set loop_messages = messages -%}
{{ bos_token }}
{#- Handle System/Tool Definitions Block -#}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}

    {#- Inject Thinking token at the very top of the FIRST system turn -#}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>' -}}
        {%- set ns.prev_message_type = 'think' -%}
    {%- endif -%}

    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}

    {%- if tools -%}
        {%- for tool in tools %}
            {{- '<|tool>' -}}
            {{- format_function_declaration(tool) | trim -}}
            {{- '<tool|>' -}}
        {%- endfor %}
        {%- set ns.prev_message_type = 'tool' -%}
    {%- endif -%}

    {{- '<turn|>\n' -}}
{%- endif %}

{#- Loop through messages -#}
{%- for message in loop_messages -%}
    {%- set ns.prev_message_type = None -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
        {{- '<|turn>' + role + '\n' }}

            {%- if message['tool_calls'] -%}
                {%- for tool_call in message['tool_calls'] -%}
                    {%- set function = tool_call['function'] -%}
                    {{- '<|tool_call>call:' + function['name'] + '{' -}}
                    {%- if function['arguments'] is mapping -%}
                        {%- set ns_args = namespace(found_first=false) -%}
                        {%- for key, value in function['arguments'] | dictsort -%}
                            {%- if ns_args.found_first %},{% endif -%}
                            {%- set ns_args.found_first = true -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                        {%- endfor -%}
                    {%- elif function['arguments'] is string -%}
                        {{- function['arguments'] -}}
                    {%- endif -%}
                    {{- '}<tool_call|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_call' -%}
            {%- endif -%}

            {%- if message['tool_responses'] -%}
                {#- Tool Response handling -#}
                {%- for tool_response in message['tool_responses'] -%}
                    {{- '<|tool_response>' -}}
                    {%- if tool_response['response'] is mapping -%}
                        {{- 'response:' + tool_response['name'] | default('unknown') + '{' -}}
                        {%- for key, value in tool_response['response'] | dictsort -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                            {%- if not loop.last %},{% endif -%}
                        {%- endfor -%}
                        {{- '}' -}}
                    {%- else -%}
                        {{- 'response:' + tool_response['name'] | default('unknown') + '{value:' + format_argument(tool_response['response'], escape_keys=False) + '}' -}}
                    {%- endif -%}
                    {{- '<tool_response|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_response' -%}
            {%- endif -%}

            {%- if message['content'] is string -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(message['content']) -}}
                {%- else -%}
                    {{- message['content'] | trim -}}
                {%- endif -%}
            {%- elif message['content'] is sequence -%}
                {%- for item in message['content'] -%}
                    {%- if item['type'] == 'text' -%}
                        {%- if role == 'model' -%}
                            {{- strip_thinking(item['text']) -}}
                        {%- else -%}
                            {{- item['text'] | trim -}}
                        {%- endif -%}
                    {%- elif item['type'] == 'image' -%}
                        {{- '\n\n<|image|>\n\n' -}}
                        {%- set ns.prev_message_type = 'image' -%}
                    {%- elif item['type'] == 'audio' -%}
                        {{- '<|audio|>' -}}
                        {%- set ns.prev_message_type = 'audio' -%}
                    {%- elif item['type'] == 'video' -%}
                        {{- '\n\n<|video|>\n\n' -}}
                        {%- set ns.prev_message_type = 'video' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

        {%- if not (message['tool_responses'] and not message['content']) -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {%- if ns.prev_message_type != 'tool_response' -%}
        {{- '<|turn>model\n' -}}
    {%- endif -%}
    {%- if not enable_thinking | default(false) -%}
        {{- '<|channel>thought\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""
