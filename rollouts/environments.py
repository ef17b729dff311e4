"""Environments and tools for multi-turn rollouts (:mod:`trlax.rollouts.multiturn`). Plain Python, no framework.

An :class:`Environment` is one episode: ``reset(row)`` gives the first observation (the prompt: a string or a
list of chat messages), then each policy turn goes to ``step(action_text)``, which returns
``(observation | None, reward | None, done)``. The multi-turn sampler appends the observation's tokens to the
row's context (continuing from the KV cache) and samples the next turn, until ``done``, ``max_turns`` or the
token budget. One environment instance serves one rollout (``num_generations`` instances per prompt).

Tool calling (the Hermes / Qwen 2.5 convention):

- tools are Python callables (:class:`Tool`) with a JSON schema (inferred from the signature and the
  Google-style docstring by ``transformers.utils.get_json_schema``, or given explicitly), rendered into the
  prompt by the tokenizer's chat template (``apply_chat_template(messages, tools=[schema, ...])``, as TRL does);
- the policy calls them with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (:func:`parse_tool_calls`);
- each call runs with a timeout (:func:`execute_tool_call`); its result — or the error, or a note that the
  call was malformed — comes back as a ``{"role": "tool", ...}`` message, so a failing tool never stops the
  run. Only the user's own tool functions are executed; the built-in :func:`calculator` evaluates arithmetic
  with an AST walker (no ``eval``).

:class:`ToolEnvironment` is the tool loop (turns without a tool call end the episode; a reward function may
score the final answer); :class:`CalculatorEnv` is the built-in toy task (the built-in addition problems with a
calculator tool) and :func:`tool_tokenizer` a small, locally built chat-templated tokenizer for it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import math
import operator
import os
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "CALCULATOR_CALL_CLOSE",
    "CALCULATOR_CALL_OPEN",
    "CalculatorEnv",
    "ChatFormat",
    "Environment",
    "EnvironmentRunError",
    "StepResult",
    "TOOL_CHAT_TEMPLATE",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "calculator",
    "execute_tool_call",
    "load_object",
    "parse_tool_calls",
    "tool_tokenizer",
]

Message = Dict[str, Any]
Observation = Union[None, str, Sequence[Message]]


class EnvironmentRunError(RuntimeError):
    """An environment's ``reset`` / ``step`` raised: the run stops (the message names the environment, the
    method, the rollout and the turn). Tool errors never raise this: they become observations."""


# ------------------------------------------------------------------------------------------------ tools


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable the policy may call, with its JSON schema (``{"type": "function", "function": {...}}``).

    ``Tool(fn)`` infers the schema from ``fn``'s type hints and Google-style docstring (``Args:`` section) with
    ``transformers.utils.get_json_schema`` — the schema transformers / TRL render for a callable passed as
    ``tools=[fn]``; pass ``schema=`` to give it explicitly. ``timeout_s`` bounds one call."""

    fn: Callable[..., Any]
    schema: Optional[Dict[str, Any]] = None
    timeout_s: float = 5.0

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Tool: `fn` must be callable, got {type(self.fn).__name__}")
        if self.schema is None:
            try:
                from transformers.utils import get_json_schema
            except ImportError as e:  # pragma: no cover - transformers is a dependency of the reference stack
                raise ImportError(f"Tool({getattr(self.fn, '__name__', self.fn)!r}): inferring a schema needs "
                                  "transformers; pass schema= explicitly") from e
            try:
                schema = get_json_schema(self.fn)
            except Exception as e:
                raise ValueError(f"Tool({getattr(self.fn, '__name__', self.fn)!r}): cannot infer its JSON schema "
                                 f"({e}); document every argument in a Google-style docstring or pass schema=") from e
            object.__setattr__(self, "schema", schema)
        fn_schema = self.schema.get("function", self.schema)
        if not isinstance(fn_schema, dict) or not isinstance(fn_schema.get("name"), str):
            raise ValueError(f"Tool: `schema` must have a function name, got {self.schema!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"Tool({fn_schema['name']!r}): timeout_s={self.timeout_s!r} must be a positive number")

    @property
    def name(self) -> str:
        return self.schema.get("function", self.schema)["name"]


def _as_tool(t, timeout_s: float) -> Tool:
    return t if isinstance(t, Tool) else Tool(t, timeout_s=timeout_s)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed call: ``name``, ``arguments`` (dict), or ``error`` (str, a malformed call) with the raw text."""

    name: Optional[str]
    arguments: Optional[Dict[str, Any]]
    error: Optional[str] = None
    raw: str = ""


_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> List[ToolCall]:
    """Hermes / Qwen-style tool calls in ``text``: every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    block, in order. ``arguments`` may also be a JSON string holding the object (some models emit that). A block
    that is not such JSON, or an opening ``<tool_call>`` without its closing tag, gives a :class:`ToolCall` with
    ``error`` set (the environment tells the model so). No call: ``[]``."""
    calls: List[ToolCall] = []
    end = 0
    for m in _CALL.finditer(text):
        end = m.end()
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, None, f"the tool call is not valid JSON ({e.msg} at char {e.pos})", body))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, None, 'the tool call must be a JSON object with a string "name"', body))
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], None, '"arguments" must be a JSON object', body))
            continue
        calls.append(ToolCall(obj["name"], args, None, body))
    rest = text[end:]
    if "<tool_call>" in rest:
        calls.append(ToolCall(None, None, "<tool_call> without a closing </tool_call>",
                              rest[rest.index("<tool_call>"):]))
    return calls


def execute_tool_call(call: ToolCall, tools: Dict[str, Tool]) -> Tuple[str, bool]:
    """Run one parsed call; returns ``(content, ok)``. Errors never raise: a malformed call, an unknown tool,
    bad arguments, an exception in the tool or a timeout (``tool.timeout_s``; the call keeps running on a daemon
    thread, its result is dropped) all come back as an ``"error: ..."`` content with ``ok=False``. A non-string
    result is JSON-encoded (``str`` if it is not JSON-serialisable)."""
    if call.error is not None:
        return f"error: malformed tool call: {call.error}. Call a tool as <tool_call>{{\"name\": NAME, " \
               f"\"arguments\": {{...}}}}</tool_call>", False
    tool = tools.get(call.name)
    if tool is None:
        return f"error: unknown tool {call.name!r}; available: {', '.join(sorted(tools)) or '(none)'}", False
    box: Dict[str, Any] = {}

    def target():
        try:
            box["result"] = tool.fn(**call.arguments)
        except BaseException as e:  # noqa: BLE001 - every tool failure becomes an observation
            box["error"] = e

    th = threading.Thread(target=target, name=f"trlax-tool-{call.name}", daemon=True)
    th.start()
    th.join(tool.timeout_s)
    if th.is_alive():
        return f"error: tool {call.name!r} timed out after {tool.timeout_s:g} s", False
    if "error" in box:
        e = box["error"]
        return f"error: {type(e).__name__}: {e}", False
    out = box.get("result")
    if isinstance(out, str):
        return out, True
    try:
        return json.dumps(out), True
    except (TypeError, ValueError):
        return str(out), True


# ----------------------------------------------------------------------------------------- environments


@dataclasses.dataclass
class StepResult:
    """What :meth:`Environment.step` returns (a plain ``(observation, reward, done)`` tuple works too)."""

    observation: Observation = None
    reward: Optional[float] = None
    done: bool = True


class Environment:
    """One episode of a multi-turn rollout (subclass it; plain Python).

    - ``tools``: :class:`Tool` s (or callables) rendered into the prompt with the chat template (``tools=``).
    - ``reset(row)``: the dataset row (a dict) -> the first observation: a prompt string (a user message) or a
      list of chat messages.
    - ``step(action_text)``: the policy's turn as text (decoded with special tokens) -> ``(observation, reward,
      done)``: ``observation`` is None, a string (a user message) or a list of messages (e.g. ``{"role": "tool",
      "content": ...}``); ``reward`` a float for this turn (or None); ``done`` ends the episode.

    Counters ``tool_calls`` / ``tool_failures`` (if the environment keeps them) are reported as metrics, and so
    are the values of an optional ``metrics() -> {name: float}`` (averaged over the batch as ``env/<name>``).
    """

    tools: Sequence[Any] = ()

    def reset(self, row: Dict[str, Any]) -> Observation:
        raise NotImplementedError

    def step(self, action_text: str):
        raise NotImplementedError

    def end_reward(self) -> Optional[float]:
        """Called when the sampler ends an episode the environment did not end (``max_turns`` reached, or the
        token budget): a reward for that turn if it gave none (default None: unscored)."""
        return None

    def demonstration(self, row: Dict[str, Any], rng) -> Optional[List[str]]:
        """The policy turns of one demonstration episode for ``row`` (each turn's text as the policy emits it,
        ending with its stop token: EOS or the text closing a tool call), for the SFT warm start of a
        multi-turn run (``--sft_warmup_steps``, :func:`trlax.train.agentic.warm_start`), which plays them
        against a fresh environment to build the transcript. ``rng``: a ``random.Random``. Default None: the
        environment has no demonstrations (a warm start is refused)."""
        return None


def _messages_of(observation: Observation, role: str = "user") -> List[Message]:
    if observation is None:
        return []
    if isinstance(observation, str):
        return [{"role": role, "content": observation}]
    msgs = list(observation)
    if not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise TypeError(f"an observation must be None, a string or a list of chat messages (dicts with 'role'), "
                        f"got {observation!r}")
    return msgs


class ToolEnvironment(Environment):
    """The tool loop: each policy turn is parsed for ``<tool_call>`` blocks; every call is executed
    (:func:`execute_tool_call`) and answered with a tool message (errors, timeouts and malformed calls included:
    the episode goes on); a turn without any call is the final answer and ends the episode, scored by
    ``reward_fn(final_text, row) -> float`` (None: no reward). ``max_tool_calls`` caps the calls of one episode
    (later turns that call a tool are told so and the episode ends).

    Args:
      tools: callables or :class:`Tool` s.
      reward_fn: optional ``(final_text, row) -> float``.
      timeout_s: default timeout of tools given as plain callables.
      max_tool_calls: calls per episode (``None``: unbounded; turns are bounded by the sampler's ``max_turns``).
      max_observation_chars: tool results / errors longer than this are cut (``None``: kept whole); bounds the
        tokens an observation takes from the completion budget.
    """

    def __init__(self, tools: Sequence[Any] = (), reward_fn: Optional[Callable[[str, Dict[str, Any]], float]] = None,
                 *, timeout_s: float = 5.0, max_tool_calls: Optional[int] = None,
                 max_observation_chars: Optional[int] = None):
        self.tools = [_as_tool(t, timeout_s) for t in tools]
        names = [t.name for t in self.tools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tools: duplicate tool name(s) {dup}")
        self._by_name = {t.name: t for t in self.tools}
        self.reward_fn = reward_fn
        self.max_tool_calls = max_tool_calls
        self.max_observation_chars = max_observation_chars
        self.row: Dict[str, Any] = {}
        self.tool_calls = self.tool_failures = self.tool_malformed = 0
        self.turns: List[str] = []

    def prompt(self, row: Dict[str, Any]) -> Observation:
        """The first observation for ``row`` (default: its ``prompt`` column)."""
        if "prompt" not in row:
            raise KeyError(f"{type(self).__name__}.reset: the row has no 'prompt' column (has: {sorted(row)})")
        return row["prompt"]

    def reset(self, row: Dict[str, Any]) -> Observation:
        self.row = dict(row)
        self.tool_calls = self.tool_failures = self.tool_malformed = 0
        self.turns = []
        return self.prompt(row)

    def final_reward(self, final_text: str) -> Optional[float]:
        return None if self.reward_fn is None else float(self.reward_fn(final_text, self.row))

    def end_reward(self) -> Optional[float]:
        """An episode cut by ``max_turns`` / the budget is scored as a final answer ``""``."""
        return self.final_reward("")

    def step(self, action_text: str):
        self.turns.append(action_text)
        calls = parse_tool_calls(action_text)
        if not calls:
            return StepResult(None, self.final_reward(action_text), True)
        msgs = []
        for call in calls:
            if self.max_tool_calls is not None and self.tool_calls >= self.max_tool_calls:
                return StepResult(None, self.final_reward(action_text), True)
            self.tool_calls += 1
            self.tool_malformed += call.error is not None
            content, ok = execute_tool_call(call, self._by_name)
            self.tool_failures += 0 if ok else 1
            if self.max_observation_chars is not None:
                content = content[: self.max_observation_chars]
            msgs.append({"role": "tool", "name": call.name or "invalid", "content": content})
        return StepResult(msgs, None, False)


# --------------------------------------------------------------------------------- chat formatting


TOOL_CHAT_TEMPLATE = (
    # A Qwen 2.5-style (ChatML + Hermes tool calls) template, written for trlax's tests and toy environment.
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n' }}{%- endif %}"
    "{{- '<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- if not loop.first %}"
    "{{- '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls', []) %}{%- set f = call['function'] if 'function' in call else call %}"
    "{{- '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + (f['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ChatFormat:
    """Token ids of prompts and observations through ``tokenizer``'s chat template.

    - :meth:`prompt_ids`: ``apply_chat_template(messages, tools=[schemas] or None, add_generation_prompt=True)``
      (TRL's call), tokenised without extra special tokens.
    - :meth:`observation_ids`: the tokens to append after a policy turn: what the template puts after an
      assistant message's content (e.g. ``<|im_end|>\\n``; minus the EOS the policy already emitted), then the
      observation messages, then the generation prompt — found as the difference of two renderings of a
      sentinel conversation (needs a prefix-preserving template; one that is not raises ``ValueError``).

    A tokenizer without a chat template is used raw: the prompt is the text, an observation the concatenated
    message contents.
    """

    _SENTINEL = "\x00trlax-turn\x00"

    def __init__(self, tokenizer, tools: Sequence[Tool] = ()):
        self.tokenizer = tokenizer
        self.schemas = [t.schema for t in tools] or None
        self.templated = getattr(tokenizer, "chat_template", None) is not None
        self._close: Optional[str] = None

    def _render(self, messages, gen: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tools=self.schemas, tokenize=False,
                                                  add_generation_prompt=gen)

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, observation: Observation) -> str:
        if not self.templated:
            return observation if isinstance(observation, str) else "".join(
                str(m.get("content", "")) for m in _messages_of(observation))
        return self._render(_messages_of(observation), True)

    def prompt_ids(self, observation: Observation) -> List[int]:
        return self._encode(self.prompt_text(observation))

    def observation_text(self, observation: Observation, ended_with_eos: bool) -> str:
        msgs = _messages_of(observation)
        if not self.templated:
            return "".join(str(m.get("content", "")) for m in msgs)
        base_msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self._SENTINEL}]
        base = self._render(base_msgs, False)
        full = self._render(base_msgs + msgs, True)
        if not full.startswith(base):
            raise ValueError("the tokenizer's chat template is not prefix-preserving (rendering more messages "
                             "changes the text of earlier ones), so observations cannot be appended to a context; "
                             "use a template that is (e.g. trlax.rollouts.TOOL_CHAT_TEMPLATE)")
        close = base[base.rindex(self._SENTINEL) + len(self._SENTINEL):]
        eos = self.tokenizer.eos_token or ""
        if ended_with_eos and eos and close.startswith(eos):
            close = close[len(eos):]
        return close + full[len(base):]

    def observation_ids(self, observation: Observation, ended_with_eos: bool) -> List[int]:
        return self._encode(self.observation_text(observation, ended_with_eos))


# ------------------------------------------------------------------------------------ the toy task


def calculator(expression: str) -> str:
    """Evaluate arithmetic.

    Args:
        expression: e.g. 3+4
    """
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.USub: operator.neg, ast.UAdd: operator.pos}

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression {expression!r}")

    if not isinstance(expression, str) or len(expression) > 64:
        raise ValueError("expression must be a string of at most 64 characters")
    value = ev(ast.parse(expression.strip(), mode="eval"))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{expression!r} is not finite")
        value = int(value) if value.is_integer() else round(value, 6)
    return str(value)


# The toy tokenizer writes the calculator call's fixed text as two tokens (the call still decodes to the Hermes
# JSON ``<tool_call>\n{"name": "calculator", "arguments": {"expression": "3+4"}}\n</tool_call>``): a tiny random
# model then has a chance to emit a well-formed call and RL has something to reinforce.
CALCULATOR_CALL_OPEN = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "'
CALCULATOR_CALL_CLOSE = '"}}\n</tool_call>'
_TOOL_TOKENS = ["<|im_start|>", "<|im_end|>", "<tool_response>", "</tool_response>", "<tools>", "</tools>",
                CALCULATOR_CALL_OPEN, CALCULATOR_CALL_CLOSE, "<tool_call>", "</tool_call>",
                "system", "user", "assistant"]
_TOOL_CHARS = list("0123456789+-*/=() \n")


def tool_tokenizer(directory: Optional[str] = None):
    """A small character-level ``PreTrainedTokenizerFast`` with :data:`TOOL_CHAT_TEMPLATE` (``tools=``
    supported), built locally with the ``tokenizers`` library (nothing is downloaded): digits and arithmetic
    characters, ChatML / Hermes markers, the calculator call's fixed text and the calculator's rendered JSON schema
    (the line the template writes between ``<tools>`` and ``</tools>``) as single tokens; other characters
    are ``<unk>``. EOS is ``<|im_end|>``. Saved to ``directory`` when given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + _TOOL_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _TOOL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = TOOL_CHAT_TEMPLATE
    # the calculator's JSON schema line, as the template renders it into the system prompt, is one token too (a
    # character-level spelling is ~270 <unk>s that bury the problem: the tiny model then cannot learn to copy it)
    text = fast.apply_chat_template([{"role": "user", "content": "u"}], tools=[calculator], tokenize=False)
    fast.add_tokens([AddedToken(text[text.index("<tools>\n") + 8:text.index("\n</tools>")], special=False,
                                normalized=False)])
    if directory:
        os.makedirs(directory, exist_ok=True)
        fast.save_pretrained(directory)
    return fast


class CalculatorEnv(ToolEnvironment):
    """The built-in toy environment: addition problems (``{"prompt": "3+4=", "answer": "7"}``; its own
    :meth:`builtin_rows` when the run's dataset is ``builtin``) with a :func:`calculator` tool.

    Reward at the end of the episode: ``1`` if the final answer (the last turn, without its EOS) is exactly
    ``answer``, plus ``format_bonus`` if it is a number (1-3 digits; as the built-in task's format reward), plus
    ``tool_bonus`` if a calculator call ran without error, plus ``attempt_bonus`` if the policy made a
    well-formed call (closed, valid JSON). The bonuses are shaping that makes tool calling and answering visible
    to a tiny random policy; an unclosed call (e.g. one cut by the token budget) earns nothing. At most
    ``max_tool_calls`` calls per episode; tool results and errors are cut to ``max_observation_chars`` characters
    (the toy tokenizer spells unknown characters as one ``<unk>`` each).
    """

    def __init__(self, tool_bonus: float = 0.2, attempt_bonus: float = 0.1, format_bonus: float = 0.2,
                 max_tool_calls: int = 2, timeout_s: float = 2.0, max_observation_chars: int = 12):
        super().__init__([Tool(calculator, timeout_s=timeout_s)], max_tool_calls=max_tool_calls,
                         max_observation_chars=max_observation_chars)
        self.tool_bonus, self.attempt_bonus = float(tool_bonus), float(attempt_bonus)
        self.format_bonus = float(format_bonus)

    def prompt(self, row):
        return [{"role": "user", "content": str(row["prompt"])}]

    def final_reward(self, final_text: str) -> float:
        answer = final_text.replace("<|im_end|>", "").strip()
        self.correct = answer == str(self.row.get("answer", "")).strip()
        number = answer.isdigit() and len(answer) <= 3
        return (float(self.correct) + (self.format_bonus if number else 0.0)
                + (self.tool_bonus if self.tool_calls > self.tool_failures else 0.0)
                + (self.attempt_bonus if self.tool_calls > self.tool_malformed else 0.0))

    # The warm start's demonstrations (:meth:`demonstration`) teach the *flow*, not the task: a fraction
    # ``demo_direct`` answer at once with a random digit (no call); the others call the calculator and answer
    # with its result, the call's expression being the problem's own in a fraction ``demo_copy`` of them and a
    # random addition otherwise. GRPO then has both rates to raise: calling the tool (reward 0.5 more than a
    # wrong direct answer) and copying the problem into the call (the exact answer).
    @staticmethod
    def builtin_rows(n: int = 1024, seed: int = 0) -> List[Dict[str, str]]:
        """The environment's own task, used when a run's ``dataset`` is ``builtin``: ``{"prompt": "3+4=",
        "answer": "7"}``, single-digit operands with a sum of at most 9 (55 distinct problems)."""
        import random

        rng = random.Random(seed)
        out: List[Dict[str, str]] = []
        while len(out) < n:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if a + b <= 9:
                out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
        return out

    demo_direct: float = 0.5
    demo_copy: float = 0.3

    def demonstration(self, row, rng) -> List[str]:
        eos = "<|im_end|>"
        if rng.random() < self.demo_direct:
            return [f"{rng.randint(0, 9)}{eos}"]
        expr = str(row["prompt"]).strip().rstrip("=").strip()
        if rng.random() >= self.demo_copy:
            a = rng.randint(0, 9)
            expr = f"{a}+{rng.randint(0, 9 - a)}"
        return [CALCULATOR_CALL_OPEN + expr + CALCULATOR_CALL_CLOSE, calculator(expr) + eos]

    def metrics(self) -> Dict[str, float]:
        """Per-episode numbers the sampler averages into its metrics (``env/accuracy``)."""
        return {"accuracy": float(getattr(self, "correct", False)),
                "well_formed_call": float(self.tool_calls > self.tool_malformed),
                "successful_call": float(self.tool_calls > self.tool_failures)}


def load_object(spec: str, field: str = "environment"):
    """``"pkg.module:Name"`` -> the object (a class, a function). Errors name ``field`` and the spec."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{field}={spec!r} must be 'pkg.module:Name'")
    mod, _, name = spec.partition(":")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"{field}={spec!r}: cannot import module {mod!r} ({e})") from None
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}={spec!r}: module {mod!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj


def environment_factory(environment: str = "", tools: str = "", reward_fn=None) -> Optional[Callable[[], Environment]]:
    """A zero-argument factory of environments from the run fields ``environment="pkg.module:Env"`` (a class or a
    factory function) or ``tools="pkg.module:fn,..."`` (a :class:`ToolEnvironment` with those functions, scored
    by ``reward_fn``); ``None`` when both are empty. Giving both raises."""
    if environment and tools:
        raise ValueError(f"environment={environment!r} and tools={tools!r}: give one (an environment declares "
                         "its own tools)")
    if environment:
        obj = load_object(environment, "environment")
        if not callable(obj):
            raise ValueError(f"environment={environment!r} is not a class or a factory function")
        if inspect.isclass(obj) and not hasattr(obj, "step"):
            raise ValueError(f"environment={environment!r}: {obj.__name__} has no step() method")
        return obj
    if tools:
        fns = [load_object(s.strip(), "tools") for s in tools.split(",") if s.strip()]
        for s, f in zip(tools.split(","), fns):
            if not callable(f):
                raise ValueError(f"tools={tools!r}: {s.strip()!r} is not callable")
        tool_objs = [Tool(f) for f in fns]  # schema errors now, naming the tool
        return lambda: ToolEnvironment(tool_objs, reward_fn)
    return None


__all__ += ["environment_factory"]
