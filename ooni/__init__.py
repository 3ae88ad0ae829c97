"""OONI interoperability: ``kzprobe import-ooni`` and ``kzprobe export --format ooni``.

``import-ooni`` reads OONI Web Connectivity measurements (0.4 and 0.5; JSON, JSONL, gzipped
JSONL, or folders of them), stores each measurement as one kzprobe run (source ``ooni``; probe_cc,
probe_asn, network, resolver and measurement_start_time kept; probe_ip is not), maps ``queries``,
``tcp_connect``, ``tls_handshakes``, ``requests`` and ``test_keys.control`` to observations (the
control as the ``control`` vantage) and classifies them with the same rules as live runs.
``export --format ooni`` writes kzprobe runs as Web Connectivity measurements, one per target,
with ``test_keys.blocking`` / ``accessible`` derived from kzprobe's verdict and kzprobe's own
verdict in ``test_keys.x_kzprobe_verdict``; ``import-ooni`` reads that back to the same verdicts.

Where kzprobe's verdict differs from OONI's ``test_keys.blocking``, on purpose
------------------------------------------------------------------------------------

=====================================  ======================  =====================================
Situation                              OONI blocking           kzprobe
=====================================  ======================  =====================================
TLS handshake reset / timed out after  ``http-failure``        ``blocked/dpi`` (``dpi.tls_reset``,
TCP worked, control completes                                  ``dpi.tls_timeout``): the censor acts
                                                               on the SNI, which is DPI, not a
                                                               failure of HTTP
HTTP request reset (Host-based)        ``http-failure``        ``blocked/dpi`` (``dpi.http_reset``)
Page differs from control's            ``http-diff``           ``blocked/dpi`` (``dpi.http_diff``),
                                                               at low confidence (0.5)
Blockpage matched by fingerprint       ``http-diff``           ``blocked/dpi`` (``dpi.blockpage``),
                                                               or ``blocked/dns`` (``dns.blockpage``)
                                                               when a DNS answer led to it
TCP connect fails, control connects    ``tcp_ip``              ``blocked/ip`` only when the failure
                                                               is seen again (a reset at once; a
                                                               timeout twice): one timeout is
                                                               ``inconclusive``
Resolver answers a wrong address       ``dns``                 ``blocked/dns``, unless the address
that serves a valid certificate for                            proves genuine (TLS with SNI = the
the domain (CDN, geo-DNS)                                      domain validates): then ``ok``
Certificate invalid for the probe,     (often ``http-failure``  ``blocked/dpi`` (``dpi.tls_mitm``),
valid for control, or issued by a      or ``false``)           naming the issuer; flagged when it
national interception CA                                       is Qaznet Trust Network or ISCA
Certificate invalid for everyone       ``false`` (down)        ``down`` or ``inconclusive``, never
(control too)                                                  ``blocked``
Control failed, the page was fetched   ``null``                ``ok`` at lower confidence: the
                                                               genuine page arrived
Control failed, a step failed          ``null``                ``inconclusive``
Site down for probe and control        ``false``               ``down``
=====================================  ======================  =====================================

Mapping choices (details in :mod:`kzprobe.ooni.importer`): A and AAAA queries of one OONI
transaction become one DNS observation, as netxlite's LookupHost and kzprobe's live probe do, so
that a missing AAAA record is not read as DNS blocking; a redirect chain (``depth`` > 0) is folded
into the outcome of the measured request, and its steps about other names are kept with purpose
``redirect`` and not compared with control; the test helper's legacy failure strings
(``dns_name_error``, ``connection_refused_error``...) are mapped onto kzprobe's; OONI failure
strings kzprobe does not know are kept as ``unknown_failure: <original>``.

Export -> OONI blocking: ok = (false, accessible true); down = (false, false); inconclusive =
(null, null); blocked/dns = "dns"; blocked/ip = "tcp_ip"; blocked/dpi = "http-diff" for
``dpi.http_diff`` and ``dpi.blockpage``, else "http-failure".
"""
