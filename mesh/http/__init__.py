"""HTTP/1.1 on the wire, knowing nothing of meshes.

`server` (a listener's connections: `receive` parses, `exchange` holds one
request's state, `respond` writes the answer, `limits` bounds them),
`client` (the pooled upstream client; `upstream` is one connection),
`framing` (what both sides share: heads, body buffers, the body writer),
`websocket` (the byte tunnel after a 101), `headers` and `paths`.
"""
