"""The commands besides training (train_loop.py), each run as `python -m whisper_ft.cli.<name>`:

    evaluate    WER/CER of any Whisper on a dataset, and the long-form check (--long-form)
    transcribe  whole audio files to txt/srt/vtt/json
    export      a CTranslate2 folder for faster-whisper, checked against the model (--verify)
    inspect     a dataset before training: broken, mislabelled and odd samples, the cost (whisper_ft.doctor)

evaluate and transcribe hold argument parsing and reporting; what they do lives in the library modules
(whisper_ft.evaluation, whisper_ft.long_form, whisper_ft.transcription, whisper_ft.model), which the
training loop and the long-form check share. export's conversion is used by nothing else and stays here.
"""
