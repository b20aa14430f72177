"""PD disaggregation: prefill on one server, decode on another, in SGLang's protocol.

```
gateway ──same body + bootstrap_host/port/room──▶ prefill server          decode server ◀── (same body)
                                                   │ computes the prompt's KV   │ reserves slots for the prompt
                                                   │ and the first token        │ asks bootstrap_host:port where
   bootstrap server (prefill, --disaggregation-    │ offers them under the room │ the KV of this rank lives,
   bootstrap-port, default 8998): GET /route ──────┼────────────────────────────┤ connects there, sends the room
                                                   ▼ KV sender ──TCP: header + KV pages──▶ KV receiver
                                                                                ▼ writes the pages into its slots
                                                                                  and decodes from the first token
```
The scheduler sees one interface per side (endpoint.py): `PrefillEndpoint.send(req, first_token)` and
`DecodeEndpoint.fetch(info, num_tokens) -> Transfer`. The transport behind it is TCP (tcp.py): it runs on any
machine and across hosts; the KV goes through host memory, which is what the decode side's slot copy reads.
"""
