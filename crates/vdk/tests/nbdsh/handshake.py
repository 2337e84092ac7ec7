# Option haggling: LIST, INFO, GO, ABORT, STRUCTURED_REPLY, LIST_META_CONTEXT, EXPORT_NAME,
# STARTTLS refused, unknown exports. Server: --export disk=disk.img(64M) --export ram=memory:32M
# --description "vdk test".

# LIST names every export with its description.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri())
listed = []
h.opt_list(lambda name, desc: listed.append((name, desc)))
assert listed == [("disk", "vdk test"), ("ram", "vdk test")], listed

# INFO on a named export gives size, flags, name, description and block sizes.
h.set_full_info(True)
h.set_export_name("ram")
h.opt_info()
assert h.get_size() == 32 * MIB
assert h.get_canonical_export_name() == "ram"
assert h.get_export_description() == "vdk test"
assert not h.is_read_only()
for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero, h.can_cache,
            h.can_multi_conn):
    assert can(), can.__name__
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB

# INFO on an unknown export fails, and haggling goes on.
h.set_export_name("nope")
try:
    h.opt_info()
    raise AssertionError("INFO on an unknown export succeeded")
except nbd.Error:
    pass

# LIST_META_CONTEXT offers base:allocation.
h.set_export_name("disk")
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name))
assert contexts == ["base:allocation"], contexts

# GO to the default export (the empty name) reaches the first export.
h.set_export_name("")
h.opt_go()
assert h.get_size() == 64 * MIB
assert h.get_structured_replies_negotiated()
assert h.can_df()
h.shutdown()

# ABORT ends haggling cleanly.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri())
h.opt_abort()
assert h.aio_is_closed(), "ABORT must close the connection"

# Without structured replies: simple replies, no DF.
h = connect("ram", structured=False, meta=False)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
h.pwrite(b"simple", 4096)
assert h.pread(6, 4096) == b"simple"
h.shutdown()

# Old-style NBD_OPT_EXPORT_NAME (client without fixed newstyle, so also the 124 zero bytes).
h = nbd.NBD()
h.set_handshake_flags(0)
h.set_request_structured_replies(False)
h.connect_uri(uri("ram"))
assert h.get_protocol() == "newstyle", h.get_protocol()
assert h.get_size() == 32 * MIB
assert h.pread(6, 4096) == b"simple"
h.shutdown()

# STARTTLS is refused: an opportunistic client goes on in plain text, a demanding one fails.
h = nbd.NBD()
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(uri("ram"))
assert not h.get_tls_negotiated()
h.shutdown()
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
try:
    h.connect_uri(uri("ram"))
    raise AssertionError("TLS_REQUIRE connected without TLS")
except nbd.Error:
    pass

# GO to an unknown export fails the connection.
h = nbd.NBD()
try:
    h.connect_uri(uri("no-such-export"))
    raise AssertionError("connected to an unknown export")
except nbd.Error as e:
    assert "no-such-export" in e.string or "unknown" in e.string.lower(), e.string
print("handshake ok")
