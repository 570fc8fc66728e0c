"""`jora gui`: a local web page to configure, launch and watch the finetune flow.

form.py (the settings as form fields), checks.py (validation before launch), progress.py (what a run
is doing, read from its log lines and work directory), runs.py (a run in a child process or through a
Prefect deployment) need no web framework; app.py builds the Gradio page and is the only module that
imports gradio, and only when the page is built.
"""
