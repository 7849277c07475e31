"""Chat formatting: the Gemma turn format for the embedded model, and explicit template selection."""

import pytest

from llmserve.chat_format import ChatFormatError, ChatFormatter, Message, select_template


def gemma() -> ChatFormatter:
    name, template = select_template("auto", None, "gemma3")  # type: ignore[misc]
    assert name == "gemma"
    return ChatFormatter(template, name=name, bos_token="<bos>", eos_token="<eos>")


def test_gemma_turns_with_the_system_text_leading_the_first_user_turn() -> None:
    prompt = gemma().render(
        [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Bye")]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_a_lone_system_message_is_not_dropped() -> None:
    prompt = gemma().render([Message("system", "Say hello.")])
    assert prompt == "<bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n"


def test_the_gguf_template_wins_unless_a_family_is_named() -> None:
    assert select_template("auto", "{{ messages }}", "gemma3") == ("gguf", "{{ messages }}")
    assert select_template("chatml", "{{ messages }}", "gemma3")[0] == "chatml"  # type: ignore[index]


def test_no_template_and_no_known_family_means_no_chat() -> None:
    assert select_template("auto", None, "mystery") is None
    with pytest.raises(ChatFormatError):
        select_template("gguf", None, "gemma3")


def test_template_errors_become_chat_format_errors() -> None:
    formatter = ChatFormatter("{{ raise_exception('roles must alternate') }}", name="t", bos_token="", eos_token="")
    with pytest.raises(ChatFormatError, match="roles must alternate"):
        formatter.render([Message("user", "x")])
