"""`flaxlm serve`: an OpenAI-compatible HTTP server with continuous batching.

`scheduler.Scheduler` runs the decode batch (programs in `slots`); `app.create_app`
is the FastAPI application over it; `cli.serve_command` the command.
"""
