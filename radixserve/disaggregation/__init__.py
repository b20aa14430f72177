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

--tp N: each prefill TP rank registers its own sender (bootstrap.py), and decode rank r fetches its shard of
the KV heads from prefill rank r; at another --tp, from the prefill ranks that hold its heads (shards.py). Only
rank 0 of a decode server talks to the API server, but every rank receives, and the ranks agree each poll
(decode_queue.Agreement, one gloo all-reduce) on which requests have all their shards, so they start decoding
them at the same step. --dp-size D on a prefill server: room r is prefilled by replica r % D, and the bootstrap
server answers with that replica's ranks. --nnodes K on a prefill server: the ranks of node k > 0 register with
the bootstrap server on node 0 (at the --dist-init-addr host) under their own node's address
(endpoint.sender_address), and the bootstrap server gives the decode side no layout until every rank is in.
"""
