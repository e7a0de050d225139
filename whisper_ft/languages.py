"""Language codes: ISO 639-1/2/3, Whisper names and Common Voice locales -> one Whisper language.

Also what metrics need to know about a language: whether it is written without spaces between words
(report CER), and the dataset config names of the corpora we know (FLEURS, Common Voice).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from transformers.models.whisper.tokenization_whisper import LANGUAGES  # whisper code -> name

# ISO 639-2/3 codes (terminology and bibliographic) of Whisper's languages.
ISO3 = {
    "eng": "en", "zho": "zh", "chi": "zh", "cmn": "zh", "deu": "de", "ger": "de", "spa": "es", "rus": "ru",
    "kor": "ko", "fra": "fr", "fre": "fr", "jpn": "ja", "por": "pt", "tur": "tr", "pol": "pl", "cat": "ca",
    "nld": "nl", "dut": "nl", "ara": "ar", "swe": "sv", "ita": "it", "ind": "id", "hin": "hi", "fin": "fi",
    "vie": "vi", "heb": "he", "ukr": "uk", "ell": "el", "gre": "el", "msa": "ms", "may": "ms", "zsm": "ms",
    "ces": "cs", "cze": "cs", "ron": "ro", "rum": "ro", "dan": "da", "hun": "hu", "tam": "ta", "nor": "no",
    "nob": "no", "tha": "th", "urd": "ur", "hrv": "hr", "bul": "bg", "lit": "lt", "lat": "la", "mri": "mi",
    "mao": "mi", "mal": "ml", "cym": "cy", "wel": "cy", "slk": "sk", "slo": "sk", "tel": "te", "fas": "fa",
    "per": "fa", "pes": "fa", "lav": "lv", "ben": "bn", "srp": "sr", "aze": "az", "slv": "sl", "kan": "kn",
    "est": "et", "mkd": "mk", "mac": "mk", "bre": "br", "eus": "eu", "baq": "eu", "isl": "is", "ice": "is",
    "hye": "hy", "arm": "hy", "nep": "ne", "npi": "ne", "mon": "mn", "bos": "bs", "kaz": "kk", "sqi": "sq",
    "alb": "sq", "swa": "sw", "swh": "sw", "glg": "gl", "mar": "mr", "pan": "pa", "sin": "si", "khm": "km",
    "sna": "sn", "yor": "yo", "som": "so", "afr": "af", "oci": "oc", "kat": "ka", "geo": "ka", "bel": "be",
    "tgk": "tg", "snd": "sd", "guj": "gu", "amh": "am", "yid": "yi", "lao": "lo", "uzb": "uz", "fao": "fo",
    "hat": "ht", "pus": "ps", "tuk": "tk", "nno": "nn", "mlt": "mt", "san": "sa", "ltz": "lb", "mya": "my",
    "bur": "my", "bod": "bo", "tib": "bo", "tgl": "tl", "fil": "tl", "mlg": "mg", "asm": "as", "tat": "tt",
    "haw": "haw", "lin": "ln", "hau": "ha", "bak": "ba", "jav": "jw", "jv": "jw", "sun": "su", "yue": "yue",
}
# Common Voice locales whose primary subtag is not the Whisper code.
CV_LOCALE = {"zh-hk": "yue", "nb-no": "no", "fy-nl": "fy", "jv": "jw"}
# Whisper code -> Common Voice locale, where they differ.
TO_CV_LOCALE = {"zh": "zh-CN", "sv": "sv-SE", "pa": "pa-IN", "hy": "hy-AM", "ne": "ne-NP", "nn": "nn-NO",
                "no": "nb-NO", "yue": "zh-HK", "jw": "jv", "es": "es", "ga": "ga-IE"}
# Whisper code -> google/fleurs config.
FLEURS = {
    "af": "af_za", "am": "am_et", "ar": "ar_eg", "as": "as_in", "az": "az_az", "be": "be_by", "bg": "bg_bg",
    "bn": "bn_in", "bs": "bs_ba", "ca": "ca_es", "cs": "cs_cz", "cy": "cy_gb", "da": "da_dk", "de": "de_de",
    "el": "el_gr", "en": "en_us", "es": "es_419", "et": "et_ee", "fa": "fa_ir", "fi": "fi_fi", "fr": "fr_fr",
    "gl": "gl_es", "gu": "gu_in", "ha": "ha_ng", "he": "he_il", "hi": "hi_in", "hr": "hr_hr", "hu": "hu_hu",
    "hy": "hy_am", "id": "id_id", "is": "is_is", "it": "it_it", "ja": "ja_jp", "jw": "jv_id", "ka": "ka_ge",
    "kk": "kk_kz", "km": "km_kh", "kn": "kn_in", "ko": "ko_kr", "lb": "lb_lu", "ln": "ln_cd", "lo": "lo_la",
    "lt": "lt_lt", "lv": "lv_lv", "mi": "mi_nz", "mk": "mk_mk", "ml": "ml_in", "mn": "mn_mn", "mr": "mr_in",
    "ms": "ms_my", "mt": "mt_mt", "my": "my_mm", "no": "nb_no", "ne": "ne_np", "nl": "nl_nl", "oc": "oc_fr",
    "pa": "pa_in", "pl": "pl_pl", "ps": "ps_af", "pt": "pt_br", "ro": "ro_ro", "ru": "ru_ru", "sd": "sd_in",
    "sk": "sk_sk", "sl": "sl_si", "sn": "sn_zw", "so": "so_so", "sr": "sr_rs", "sv": "sv_se", "sw": "sw_ke",
    "ta": "ta_in", "te": "te_in", "tg": "tg_tj", "th": "th_th", "tl": "fil_ph", "tr": "tr_tr", "uk": "uk_ua",
    "ur": "ur_pk", "uz": "uz_uz", "vi": "vi_vn", "yo": "yo_ng", "zh": "cmn_hans_cn", "yue": "yue_hant_hk",
}
# Written without spaces between words: WER is meaningless there, CER is the number to watch.
NO_SPACES = {"zh", "ja", "th", "lo", "km", "my", "yue", "bo"}


class LanguageError(ValueError):
    pass


@dataclass(frozen=True)
class Language:
    code: str  # Whisper's code, as in the <|code|> token
    name: str  # Whisper's English name

    @property
    def token(self) -> str:
        return f"<|{self.code}|>"

    @property
    def uses_spaces(self) -> bool:
        return self.code not in NO_SPACES

    @property
    def cv_locale(self) -> str:
        return TO_CV_LOCALE.get(self.code, self.code)

    def dataset_config(self, dataset_name: str) -> str | None:
        """The config (subset) of a known Hub dataset for this language; None when unknown."""
        name = dataset_name.lower()
        if "fleurs" in name:
            return FLEURS.get(self.code)
        if "common_voice" in name or "commonvoice" in name:
            return self.cv_locale
        return None


def resolve(lang: str) -> Language:
    """Accepts 'as', 'asm', 'assamese', 'Assamese', 'pa-IN', 'sv-SE', 'zh-CN'; raises LanguageError with close matches."""
    key = str(lang).strip().lower().replace("_", "-")
    names = {name: code for code, name in LANGUAGES.items()}
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE  # includes aliases (castilian…)

    code = None
    if key in LANGUAGES:
        code = key
    elif key in TO_LANGUAGE_CODE:
        code = TO_LANGUAGE_CODE[key]
    elif key in ISO3:
        code = ISO3[key]
    elif key in CV_LOCALE:
        code = CV_LOCALE[key]
    elif "-" in key and key.split("-")[0] in LANGUAGES:
        code = key.split("-")[0]
    if code is None or code not in LANGUAGES:
        candidates = list(LANGUAGES) + list(names) + list(ISO3)
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise LanguageError(f"lang {lang!r} is not a language Whisper knows{hint}")
    return Language(code=code, name=LANGUAGES[code])
