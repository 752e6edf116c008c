"""The conversations the scripted test checkpoint answers (`mlx_unified.testing.scripted`): a tool-call
round trip through Gemma 4's template, and one question asked with thinking on and with it off."""

from __future__ import annotations

import json

from mlx_unified.testing.scripted import ScriptedReply

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ARGUMENTS = {"city": "Paris"}
TOOL_RESULT = "sunny, 21 C"
WEATHER_ANSWER = "It is sunny in Paris, 21 C."
PRIME = [{"role": "user", "content": "Is 7 a prime number?"}]
THOUGHT = "7 has no divisor but 1 and 7."
THINKING_ANSWER = "Yes, 7 is prime."
PLAIN_ANSWER = "Yes."
CONTEXT_TOKENS = 4096  # the checkpoint's context, small enough to overflow in a test


def after_call(call_id: str) -> list[dict]:
    """The conversation once the model called the tool and the client sent the result back."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGUMENTS)}}
    return [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


REPLIES = [
    ScriptedReply(
        ASK_WEATHER,
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
        {"tools": [WEATHER_TOOL]},
    ),
    ScriptedReply(after_call("call_0"), f"{WEATHER_ANSWER}<turn|>", {"tools": [WEATHER_TOOL]}),
    ScriptedReply(PRIME, f"<|channel>thought\n{THOUGHT}<channel|>{THINKING_ANSWER}<turn|>", {"enable_thinking": True}),
    ScriptedReply(PRIME, f"{PLAIN_ANSWER}<turn|>", {"enable_thinking": False}),
]
