/* SPDX-License-Identifier: GPL-2.0-or-later */
/* TLS sessions for exports (GnuTLS), from the credentials objects of tls.c. */
#ifndef VDD_TLS_H
#define VDD_TLS_H

#include <gnutls/gnutls.h>
#include <stdbool.h>

#include "daemon.h"

bool vdd_tls_creds_is_server(const struct vdd_tls_creds *c);
/* A server session on fd (non-blocking) with c's credentials. */
int vdd_tls_session_new(struct vdd_tls_creds *c, int fd, gnutls_session_t *out, char **errp);
/*
 * From a coroutine: run the handshake, parking on cofd while the socket is
 * not ready; gives up once *broken is set.  Verifies the client certificate
 * when the credentials ask for it (verify-peer).
 */
int vdd_tls_handshake(struct vdd_tls_creds *c, gnutls_session_t s, struct vdd_cofd *cofd, const bool *broken,
		      char **errp);

#endif
