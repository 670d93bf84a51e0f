"""A minimal WinRM-over-HTTP endpoint whose NTLM side is pyspnego's acceptor, to check kiln's
NTLM *client* (negotiate, AUTHENTICATE with NTLMv2 + MIC, sealing, unsealing) against an
implementation that is not kiln's. Used by tests/tests/winrm_clients.rs.

usage: NTLM_USER_FILE=FILE ntlm_acceptor.py
  FILE holds `DOMAIN:USER:PASSWORD` lines (pyspnego's credential store format).
Prints `PORT <n>` on stdout once listening, then one JSON line per sealed request it opened:
{"action": ..., "user": ...}. A Create gets a sealed CreateResponse with the ShellId
`PYSPNEGO-SHELL`; anything else a sealed SOAP fault. Runs until killed.
"""
import base64
import http.server
import json
import re
import struct
import sys

import spnego

BOUNDARY = b"--Encrypted Boundary"
PROTOCOL = b"application/HTTP-SPNEGO-session-encrypted"

CREATE_RESPONSE = """<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" \
xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" \
xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" \
xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"><s:Header>\
<a:Action>http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse</a:Action></s:Header>\
<s:Body><x:ResourceCreated><a:ReferenceParameters><w:SelectorSet>\
<w:Selector Name="ShellId">PYSPNEGO-SHELL</w:Selector></w:SelectorSet></a:ReferenceParameters>\
</x:ResourceCreated></s:Body></s:Envelope>"""

FAULT = """<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><s:Fault>\
<s:Code><s:Value>s:Sender</s:Value></s:Code><s:Reason><s:Text xml:lang="en-US">only Create is \
answered here</s:Text></s:Reason></s:Fault></s:Body></s:Envelope>"""


def seal(ctx, plaintext):
    w = ctx.wrap_winrm(plaintext)
    return (
        BOUNDARY + b"\r\n\tContent-Type: " + PROTOCOL + b"\r\n"
        b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length="
        + str(len(plaintext)).encode() + b"\r\n" + BOUNDARY + b"\r\n"
        b"\tContent-Type: application/octet-stream\r\n"
        + struct.pack("<i", len(w.header)) + w.header + w.data + BOUNDARY + b"--\r\n"
    )


def unseal(ctx, body):
    parts = [p for p in body.split(BOUNDARY + b"\r\n") if p]
    length = int(parts[0].split(b"Length=")[1].strip())
    payload = parts[1]
    if payload.endswith(BOUNDARY + b"--\r\n"):
        payload = payload[: -len(BOUNDARY + b"--\r\n")]
    payload = payload.replace(b"\tContent-Type: application/octet-stream\r\n", b"", 1)
    sig_len = struct.unpack("<i", payload[:4])[0]
    msg = ctx.unwrap_winrm(payload[4 : 4 + sig_len], payload[4 + sig_len :])
    assert len(msg) == length, "length mismatch"
    return msg


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ctx = None

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        auth = self.headers.get("Authorization")
        if auth:
            scheme, token = auth.split(" ", 1)
            if self.ctx is None or self.ctx.complete:
                self.ctx = spnego.server(protocol="ntlm")
            try:
                out = self.ctx.step(base64.b64decode(token))
            except Exception as e:  # bad credentials, malformed token
                self.ctx = None
                self.reply(401, str(e).encode(), [("WWW-Authenticate", "Negotiate")])
                return
            if not self.ctx.complete:
                self.reply(401, b"", [("WWW-Authenticate", "Negotiate " + base64.b64encode(out).decode())])
                return
            if not body:
                self.reply(200)
                return
        if self.ctx is None or not self.ctx.complete:
            self.reply(401, b"", [("WWW-Authenticate", "Negotiate")])
            return
        if not self.headers.get("Content-Type", "").startswith("multipart/encrypted"):
            self.reply(400, b"plaintext refused")
            return
        msg = unseal(self.ctx, body).decode()
        action = re.search(r"<a:Action[^>]*>([^<]*)</a:Action>", msg).group(1)
        print(json.dumps({"action": action, "user": str(self.ctx.client_principal)}), flush=True)
        if action.endswith("/transfer/Create"):
            status, resp = 200, CREATE_RESPONSE
        else:
            status, resp = 500, FAULT
        ctype = 'multipart/encrypted;protocol="application/HTTP-SPNEGO-session-encrypted";boundary="Encrypted Boundary"'
        self.reply(status, seal(self.ctx, resp.encode()), [("Content-Type", ctype)])


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print("PORT", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
