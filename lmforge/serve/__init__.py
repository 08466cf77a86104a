"""Serving: an OpenAI-compatible HTTP server on the engine loop (`app.py`), its request and error shapes
(`protocol.py`) and `lmforge serve MODEL` (`commands.py`).

    lmforge serve runs/arith-sft --port 8000
    python -c "from openai import OpenAI; print(OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-')
               .completions.create(model='arith-sft', prompt='What is', max_tokens=8).choices[0].text)"
"""
