"""Drive a WinRS endpoint with pywinrm and print what happened as JSON (one object on stdout).

Used by tests/tests/winrm_clients.rs to check kiln's WinRS test server against independent
clients: pywinrm 0.5 (PyPI, NTLM through pyspnego) and Debian's python3-winrm 0.3.0 (NTLM through
ntlm-auth). This script asserts nothing; the Rust test does.

usage: winrm_client.py ENDPOINT TRANSPORT USER PASSWORD
  TRANSPORT: "basic" (HTTPS, certificate not validated: the server's is self-signed) or
             "ntlm" (HTTP, message encryption forced on)
"""
import base64
import json
import sys

import winrm


def result(r):
    return {
        "status": r.status_code,
        "stdout": r.std_out.decode("utf-8", "replace"),
        "stderr": r.std_err.decode("utf-8", "replace"),
    }


def main():
    endpoint, transport, user, password = sys.argv[1:5]
    kwargs = {
        "transport": transport,
        # short Receive timeouts so that the OperationTimeout fault path is exercised
        "operation_timeout_sec": 1,
        "read_timeout_sec": 10,
    }
    if transport == "basic":
        kwargs["server_cert_validation"] = "ignore"
    else:
        kwargs["message_encryption"] = "always"
    s = winrm.Session(endpoint, auth=(user, password), **kwargs)
    out = {"version": getattr(winrm, "__version__", "unknown")}
    out["echo"] = result(s.run_cmd("echo", ["hello", "world"]))
    out["exit7"] = result(s.run_cmd("printf out; printf err >&2; exit 7"))
    out["slow"] = result(s.run_cmd("sleep 3; echo slept"))
    out["ps"] = result(s.run_ps("echo from-powershell"))

    # Protocol level: one shell, stdin through Send, output through Receive, Signal, Delete.
    p = s.protocol
    shell = p.open_shell()
    cid = p.run_command(shell, "cat")
    if hasattr(p, "send_command_input"):
        p.send_command_input(shell, cid, b"stdin through Send\n", end=True)
        o, e, code = p.get_command_output(shell, cid)
        out["stdin"] = {"status": code, "stdout": o.decode(), "stderr": e.decode()}
    else:
        # pywinrm 0.3 has no Send; release the command without input
        out["stdin"] = None
    p.cleanup_command(shell, cid)
    p.close_shell(shell)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
