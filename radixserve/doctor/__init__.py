"""radixserve doctor: the tuning guide as software.

    python -m radixserve.doctor server.log            # a log of radixserve or SGLang
    python -m radixserve.doctor http://127.0.0.1:1919 # a live server (/metrics + /get_server_info)

It reads the lines the guide tells people to read by eye (the start-up memory line, `Decode batch.`,
`Prefill batch.`, `KV cache pool is full. Retract requests.`, out-of-memory errors) and prints the guide's
diagnosis as flag changes with the numbers behind them. It imports nothing from the engine, so it runs
anywhere a log can be copied to."""
from radixserve.doctor.evidence import Evidence
from radixserve.doctor.logs import parse_log
from radixserve.doctor.rules import Finding, diagnose

__all__ = ["Evidence", "Finding", "diagnose", "parse_log"]
