"""Environments and tools (trlax.rollouts.environments): Hermes / Qwen ``<tool_call>`` parsing, tool execution
(errors, timeouts, unknown tools, malformed calls -> observations; the run goes on), the tool loop, the built-in
calculator toy environment, chat formatting of prompts and observations, and rendering parity with TRL's
``apply_chat_template(..., tools=)`` on a locally built chat-templated tokenizer. No model, no compilation.
"""

from __future__ import annotations

import time

import pytest

from trlax.rollouts import (CALCULATOR_CALL_CLOSE, CALCULATOR_CALL_OPEN, CalculatorEnv, ChatFormat, Tool, ToolCall,
                            ToolEnvironment, calculator, execute_tool_call, parse_tool_calls, tool_tokenizer)
from trlax.rollouts.environments import environment_factory, load_object


def weather(city: str, unit: str = "celsius") -> str:
    """Get the weather in a city.

    Args:
        city: the city name
        unit: celsius or fahrenheit
    """
    if city == "Atlantis":
        raise LookupError("no such city")
    return f"sunny in {city} ({unit})"


def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "done"


@pytest.fixture(scope="module")
def tok():
    return tool_tokenizer()


def test_parse_tool_calls():
    text = ('I will call. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2*3\\"}"}</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("weather", {"city": "Paris"}, None), ("calculator", {"expression": "2*3"}, None)]
    assert parse_tool_calls("no call here 42") == []
    bad = parse_tool_calls("<tool_call>{name: weather}</tool_call>")
    assert len(bad) == 1 and bad[0].error.startswith("the tool call is not valid JSON")
    assert "string \"name\"" in parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[0].error
    assert "must be a JSON object" in parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')[0].error
    unclosed = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')
    assert len(unclosed) == 1 and "without a closing" in unclosed[0].error


def test_tool_errors_timeouts_and_malformed_calls_become_observations():
    tools = {t.name: t for t in (Tool(weather), Tool(slow, timeout_s=0.05), Tool(calculator))}
    assert execute_tool_call(ToolCall("weather", {"city": "Oslo"}), tools) == ("sunny in Oslo (celsius)", True)
    out, ok = execute_tool_call(ToolCall("weather", {"city": "Atlantis"}), tools)
    assert not ok and out == "error: LookupError: no such city"
    out, ok = execute_tool_call(ToolCall("weather", {"town": "Oslo"}), tools)  # bad arguments
    assert not ok and out.startswith("error: TypeError")
    t0 = time.time()
    out, ok = execute_tool_call(ToolCall("slow", {"seconds": 2}), tools)
    assert not ok and out == "error: tool 'slow' timed out after 0.05 s" and time.time() - t0 < 1.0
    out, ok = execute_tool_call(ToolCall("search", {}), tools)
    assert not ok and "unknown tool 'search'" in out and "calculator" in out
    out, ok = execute_tool_call(parse_tool_calls("<tool_call>oops</tool_call>")[0], tools)
    assert not ok and out.startswith("error: malformed tool call") and "<tool_call>" in out
    # the calculator evaluates arithmetic only (no eval of arbitrary code)
    assert calculator("12*(3+4)") == "84" and calculator("7/2") == "3.5" and calculator("8/2") == "4"
    for bad in ("__import__('os').system('true')", "2**1000", "x+1", "1/0"):
        assert execute_tool_call(ToolCall("calculator", {"expression": bad}), tools)[0].startswith("error:")


def test_tool_environment_loop():
    env = ToolEnvironment([weather], reward_fn=lambda text, row: float(row["answer"] in text), max_tool_calls=2)
    assert env.reset({"prompt": "weather?", "answer": "sunny"}) == "weather?"
    res = env.step('<tool_call>{"name": "weather", "arguments": {"city": "Atlantis"}}</tool_call>')
    assert not res.done and res.reward is None
    assert res.observation == [{"role": "tool", "name": "weather", "content": "error: LookupError: no such city"}]
    res = env.step("<tool_call>not json</tool_call>")  # malformed: the model is told, the episode goes on
    assert not res.done and "malformed tool call" in res.observation[0]["content"]
    res = env.step('<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert res.done  # over max_tool_calls: the episode ends, scored as a final answer
    assert env.tool_calls == 2 and env.tool_failures == 2
    env.reset({"prompt": "q", "answer": "sunny"})
    assert env.step("it is sunny").reward == 1.0 and env.end_reward() == 0.0


def test_calculator_env_rewards(tok):
    env = CalculatorEnv()
    env.reset({"prompt": "3+4=", "answer": "7"})
    call = tok.decode(tok(CALCULATOR_CALL_OPEN + "3+4" + CALCULATOR_CALL_CLOSE, add_special_tokens=False)["input_ids"])
    res = env.step(call)
    assert res.observation[0]["content"] == "7" and not res.done
    assert env.step("7").reward == pytest.approx(1.0 + env.format_bonus + env.tool_bonus + env.attempt_bonus)
    env.reset({"prompt": "3+4=", "answer": "7"})
    assert env.step("7").reward == 1.0 + env.format_bonus and env.tool_calls == 0
    env.reset({"prompt": "3+4=", "answer": "7"})
    res = env.step(CALCULATOR_CALL_OPEN + "3+" + CALCULATOR_CALL_CLOSE)  # a failed call: only the attempt bonus
    assert res.observation[0]["content"] == "error: Synta"  # cut to max_observation_chars
    assert env.step("8").reward == pytest.approx(env.format_bonus + env.attempt_bonus)
    assert env.metrics() == {"accuracy": 0.0, "well_formed_call": 1.0, "successful_call": 0.0}
    env.reset({"prompt": "3+4=", "answer": "7"})
    env.step(CALCULATOR_CALL_OPEN + "3+4")  # unclosed (e.g. cut by the budget): no bonus at all
    assert env.end_reward() == 0.0 and env.tool_malformed == 1
    assert len(tok(CALCULATOR_CALL_OPEN + "3+4" + CALCULATOR_CALL_CLOSE, add_special_tokens=False)["input_ids"]) == 5
    # the calculator's schema line is one token of the toy tokenizer: the prompt is short, the problem's digits
    # are tokens of their own (the text is the template's, unchanged)
    fmt = ChatFormat(tok, env.tools)
    text = fmt.prompt_text(env.reset({"prompt": "3+4=", "answer": "7"}))
    assert '"description": "Evaluate arithmetic."' in text
    pieces = tok.convert_ids_to_tokens(fmt.prompt_ids(env.reset({"prompt": "3+4=", "answer": "7"})))
    assert len(pieces) < 30 and "<unk>" not in pieces and pieces[-9:-5] == ["3", "+", "4", "="]


@pytest.mark.trl
def test_prompts_with_tools_render_as_trl(tok):
    from trl.data_utils import apply_chat_template as trl_apply_chat_template

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4="}]
    fmt = ChatFormat(tok, [Tool(calculator), Tool(weather)])
    text = fmt.prompt_text(msgs)
    assert text == trl_apply_chat_template({"prompt": msgs}, tok, tools=[calculator, weather])["prompt"]
    assert '"name": "calculator"' in text and text.endswith("<|im_start|>assistant\n")
    # GRPOTrainer's own call: callables as tools, tokenised by the template
    ids = tok.apply_chat_template(conversation=[msgs], tools=[calculator, weather], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"][0]
    assert fmt.prompt_ids(msgs) == list(ids)
    no_tools = ChatFormat(tok)
    assert no_tools.prompt_text("3+4=") == trl_apply_chat_template(
        {"prompt": [{"role": "user", "content": "3+4="}]}, tok)["prompt"]


def test_observations_continue_the_rendered_conversation(tok):
    fmt = ChatFormat(tok, [Tool(calculator)])
    user = [{"role": "user", "content": "3+4="}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3+4"}}}]}
    tool_msg = [{"role": "tool", "name": "calculator", "content": "7"}]
    # the policy stopped at the tool call's closing token (no EOS): the observation closes its turn
    turn = CALCULATOR_CALL_OPEN + "3+4" + CALCULATOR_CALL_CLOSE
    full = tok.apply_chat_template(user + [call] + tool_msg, tools=[calculator], tokenize=False,
                                   add_generation_prompt=True)
    assert fmt.prompt_text(user) + turn + fmt.observation_text(tool_msg, ended_with_eos=False) == full
    # the policy ended its turn with EOS: the observation does not repeat it
    assert fmt.prompt_text(user) + turn + "<|im_end|>" + fmt.observation_text(tool_msg, ended_with_eos=True) == full
    ids = fmt.prompt_ids(user) + tok(turn, add_special_tokens=False)["input_ids"] + fmt.observation_ids(tool_msg, False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    # a plain-text observation is a user message
    assert fmt.observation_text("try again", True).startswith("\n<|im_start|>user\ntry again<|im_end|>")


def test_non_prefix_preserving_template_is_rejected(tok):
    import copy

    t2 = copy.deepcopy(tok)
    t2.chat_template = "{% for m in messages %}{{ m['content'] }}|{{ messages | length }}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-preserving"):
        ChatFormat(t2).observation_ids("x", True)


def test_factories_and_loading_name_the_field():
    f = environment_factory("trlax.rollouts.environments:CalculatorEnv")
    assert isinstance(f(), CalculatorEnv)
    env = environment_factory(tools=f"{__name__}:weather,trlax.rollouts.environments:calculator")()
    assert [t.name for t in env.tools] == ["weather", "calculator"]
    assert environment_factory() is None
    with pytest.raises(ValueError, match="environment='nope' must be 'pkg.module:Name'"):
        environment_factory("nope")
    with pytest.raises(ValueError, match="tools=.*cannot import module 'no_such_mod'"):
        environment_factory(tools="no_such_mod:f")
    with pytest.raises(ValueError, match="environment=.*has no attribute 'Nope'"):
        load_object("trlax.rollouts.environments:Nope")
    with pytest.raises(ValueError, match="give one"):
        environment_factory("a:b", "c:d")
    with pytest.raises(ValueError, match=r"Tool\('undocumented'\): cannot infer its JSON schema"):
        def undocumented(x):
            return x
        Tool(undocumented)
    with pytest.raises(ValueError, match="duplicate tool name"):
        ToolEnvironment([calculator, calculator])


def test_calculator_warm_start_demonstrations(tok):
    """The SFT warm start's transcripts (trlax.train.agentic.demonstration_rows): the prompt exactly as the
    multi-turn sampler renders it; the completion the interleaved block (call, the observation ChatFormat appends,
    answer) tokenised as the sampler's pieces; the flow without the task (a fraction answer directly, the calls
    copy the problem only in a fraction); replaying a copying demonstration earns the full reward."""
    import random

    from trlax.train.agentic import demonstration_rows

    rows = CalculatorEnv.builtin_rows(400, 0)
    assert all(int(r["prompt"][0]) + int(r["prompt"][2]) == int(r["answer"]) <= 9 for r in rows)
    assert len({r["prompt"] for r in rows}) == 55
    demos = demonstration_rows(CalculatorEnv, tok, rows, seed=0)
    env = CalculatorEnv()
    fmt = ChatFormat(tok, env.tools)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    n_call = n_copy = 0
    for row, d in zip(rows, demos):
        assert d["prompt"] == fmt.prompt_text(env.reset(row))
        if not d["completion"].startswith(CALCULATOR_CALL_OPEN):
            assert d["completion"][:-len("<|im_end|>")].isdigit() and d["completion"].endswith("<|im_end|>")
            continue
        n_call += 1
        call, rest = d["completion"].split(CALCULATOR_CALL_CLOSE)
        expr = call[len(CALCULATOR_CALL_OPEN):]
        obs = fmt.observation_text([{"role": "tool", "name": "calculator", "content": calculator(expr)}], False)
        assert rest == obs + calculator(expr) + "<|im_end|>"
        assert enc(d["completion"]) == enc(call + CALCULATOR_CALL_CLOSE) + enc(obs) + enc(rest[len(obs):])
        n_copy += expr == row["prompt"][:-1]
    assert 0.4 < n_call / len(rows) < 0.6 and 0.2 < n_copy / n_call < 0.45  # demo_direct 0.5, demo_copy 0.3 (+ luck)
    # per_turn (the warm start's rows): one row per policy turn, the context before it as the prompt, so the SFT
    # loss covers the policy's tokens only; the same transcripts
    turn_rows = iter(demonstration_rows(CalculatorEnv, tok, rows, seed=0, per_turn=True))
    for d in demos:
        first = next(turn_rows)
        assert first["prompt"] == d["prompt"]
        if first["completion"].endswith("<|im_end|>"):  # a direct answer: one turn
            assert first["completion"] == d["completion"]
            continue
        second = next(turn_rows)
        assert first["completion"].endswith(CALCULATOR_CALL_CLOSE)
        assert second["completion"][:-len("<|im_end|>")].isdigit()
        assert second["prompt"] + second["completion"] == d["prompt"] + d["completion"]
    assert next(turn_rows, None) is None
    # a copying demonstration played against the environment: correct, a number, a call that ran, well-formed
    row = {"prompt": "3+4=", "answer": "7"}
    env.demo_copy = 1.0
    turns = next(t for t in (env.demonstration(row, random.Random(s)) for s in range(20)) if len(t) == 2)
    assert turns == [CALCULATOR_CALL_OPEN + "3+4" + CALCULATOR_CALL_CLOSE, "7<|im_end|>"]
    env.reset(row)
    assert env.step(turns[0]).done is False
    assert env.step("7").reward == pytest.approx(1.5)
