import pytest

from whisper_ft.languages import LanguageError, resolve


@pytest.mark.parametrize("given,code", [("as", "as"), ("asm", "as"), ("assamese", "as"), ("Assamese", "as"),
                                        ("zh-CN", "zh"), ("sv-SE", "sv"), ("pa-IN", "pa"), ("zh-HK", "yue"),
                                        ("fil", "tl"), ("jv", "jw"), ("ger", "de"), ("castilian", "es")])
def test_codes_names_and_locales(given, code):
    assert resolve(given).code == code


def test_dataset_configs():
    assert resolve("as").dataset_config("google/fleurs") == "as_in"
    assert resolve("sv").dataset_config("some/common_voice_17_0") == "sv-SE"
    assert resolve("zh").uses_spaces is False and resolve("as").uses_spaces is True


def test_unknown_language_lists_close_matches():
    with pytest.raises(LanguageError, match="close matches: assamese"):
        resolve("assamse")
