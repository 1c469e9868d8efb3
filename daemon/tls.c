/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * TLS credentials objects, as QEMU's:
 *   --object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off][,priority=...]
 *       DIR/ca-cert.pem, DIR/server-cert.pem, DIR/server-key.pem (DIR/ca-crl.pem optional);
 *       verify-peer (default on) requires a client certificate signed by the CA.
 *   --object tls-creds-psk,id=ID,dir=DIR,endpoint=server[,priority=...]
 *       DIR/keys.psk: lines "username:hexkey".
 * Only server endpoints are useful to the daemon.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tls.h"

struct vdd_tls_creds {
	struct vdd_tls_creds *next;
	char *id;
	char *dir;
	char *priority;
	bool psk;
	bool server;
	bool verify_peer;
	gnutls_certificate_credentials_t x509;
	gnutls_psk_server_credentials_t psk_creds;
};

static struct vdd_tls_creds *creds_list;
static bool gnutls_ready;

struct vdd_tls_creds *vdd_tls_creds_find(const char *id)
{
	for (struct vdd_tls_creds *c = creds_list; c; c = c->next)
		if (!strcmp(c->id, id))
			return c;
	return NULL;
}

bool vdd_tls_creds_is_server(const struct vdd_tls_creds *c)
{
	return c->server;
}

static char *path_in(const char *dir, const char *name)
{
	char *p;

	if (asprintf(&p, "%s/%s", dir, name) < 0)
		return NULL;
	return p;
}

static int load_x509(struct vdd_tls_creds *c, char **errp)
{
	char *ca = path_in(c->dir, "ca-cert.pem"), *crl = path_in(c->dir, "ca-crl.pem");
	char *cert = path_in(c->dir, "server-cert.pem"), *key = path_in(c->dir, "server-key.pem");
	int ret = -1, r;

	if (!ca || !crl || !cert || !key) {
		vdd_error(errp, "out of memory");
		goto out;
	}
	r = gnutls_certificate_allocate_credentials(&c->x509);
	if (r < 0) {
		vdd_error(errp, "cannot allocate credentials: %s", gnutls_strerror(r));
		goto out;
	}
	if (access(ca, R_OK) == 0) {
		r = gnutls_certificate_set_x509_trust_file(c->x509, ca, GNUTLS_X509_FMT_PEM);
		if (r < 0) {
			vdd_error(errp, "cannot load '%s': %s", ca, gnutls_strerror(r));
			goto out;
		}
	} else if (c->verify_peer) {
		vdd_error(errp, "'%s' is needed to verify clients (verify-peer=on): %s", ca, strerror(errno));
		goto out;
	}
	if (access(crl, R_OK) == 0) {
		r = gnutls_certificate_set_x509_crl_file(c->x509, crl, GNUTLS_X509_FMT_PEM);
		if (r < 0) {
			vdd_error(errp, "cannot load '%s': %s", crl, gnutls_strerror(r));
			goto out;
		}
	}
	r = gnutls_certificate_set_x509_key_file(c->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (r < 0) {
		vdd_error(errp, "cannot load '%s' / '%s': %s", cert, key, gnutls_strerror(r));
		goto out;
	}
	ret = 0;
out:
	free(ca);
	free(crl);
	free(cert);
	free(key);
	return ret;
}

static int load_psk(struct vdd_tls_creds *c, char **errp)
{
	char *file = path_in(c->dir, "keys.psk");
	int r, ret = -1;

	if (!file)
		return vdd_error(errp, "out of memory");
	if (access(file, R_OK) < 0) {
		vdd_error(errp, "cannot read '%s': %s", file, strerror(errno));
		goto out;
	}
	r = gnutls_psk_allocate_server_credentials(&c->psk_creds);
	if (r < 0 || (r = gnutls_psk_set_server_credentials_file(c->psk_creds, file)) < 0) {
		vdd_error(errp, "cannot load '%s': %s", file, gnutls_strerror(r));
		goto out;
	}
	ret = 0;
out:
	free(file);
	return ret;
}

static void creds_free(struct vdd_tls_creds *c)
{
	if (c->x509)
		gnutls_certificate_free_credentials(c->x509);
	if (c->psk_creds)
		gnutls_psk_free_server_credentials(c->psk_creds);
	free(c->id);
	free(c->dir);
	free(c->priority);
	free(c);
}

int vdd_tls_creds_add(const char *type, json_t *opts, char **errp)
{
	static const char *const known[] = { "qom-type", "id", "dir", "endpoint", "verify-peer", "priority",
					     "username", NULL };
	const char *id, *dir, *endpoint, *priority;
	struct vdd_tls_creds *c;
	bool psk = !strcmp(type, "tls-creds-psk"), verify;
	int ret;

	if (vdd_args_check(opts, known, type, errp) < 0 || vdd_arg_str(opts, "id", true, NULL, &id, errp) < 0 ||
	    vdd_arg_str(opts, "dir", true, NULL, &dir, errp) < 0 ||
	    vdd_arg_str(opts, "endpoint", false, "client", &endpoint, errp) < 0 ||
	    vdd_arg_str(opts, "priority", false, NULL, &priority, errp) < 0 ||
	    vdd_arg_bool(opts, "verify-peer", true, &verify, errp) < 0) {
		vdd_error_prefix(errp, "%s: ", type);
		return -1;
	}
	if (strcmp(endpoint, "server") && strcmp(endpoint, "client"))
		return vdd_error(errp, "%s: endpoint must be server or client", type);
	if (vdd_tls_creds_find(id))
		return vdd_error(errp, "%s: object '%s' already exists", type, id);
	if (!gnutls_ready) {
		ret = gnutls_global_init();
		if (ret < 0)
			return vdd_error(errp, "cannot initialise GnuTLS: %s", gnutls_strerror(ret));
		gnutls_ready = true;
	}
	c = calloc(1, sizeof(*c));
	if (!c || !(c->id = strdup(id)) || !(c->dir = strdup(dir)) || (priority && !(c->priority = strdup(priority)))) {
		if (c)
			creds_free(c);
		return vdd_error(errp, "out of memory");
	}
	c->psk = psk;
	c->server = !strcmp(endpoint, "server");
	c->verify_peer = verify;
	ret = psk ? load_psk(c, errp) : load_x509(c, errp);
	if (ret < 0) {
		vdd_error_prefix(errp, "%s '%s': ", type, id);
		creds_free(c);
		return -1;
	}
	c->next = creds_list;
	creds_list = c;
	return 0;
}

void vdd_tls_creds_free_all(void)
{
	while (creds_list) {
		struct vdd_tls_creds *c = creds_list;

		creds_list = c->next;
		creds_free(c);
	}
	if (gnutls_ready)
		gnutls_global_deinit();
	gnutls_ready = false;
}

json_t *vdd_query_tls_creds(void)
{
	json_t *list = json_array();

	for (struct vdd_tls_creds *c = creds_list; c; c = c->next)
		json_array_append_new(list, json_pack("{s:s, s:s, s:s, s:s, s:b}", "id", c->id, "type",
						      c->psk ? "tls-creds-psk" : "tls-creds-x509", "dir", c->dir,
						      "endpoint", c->server ? "server" : "client", "verify-peer",
						      c->verify_peer));
	return list;
}

int vdd_tls_session_new(struct vdd_tls_creds *c, int fd, gnutls_session_t *out, char **errp)
{
	gnutls_session_t s;
	const char *prio = c->priority ? c->priority : c->psk ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL";
	int r = gnutls_init(&s, GNUTLS_SERVER | GNUTLS_NONBLOCK);

	if (r < 0)
		return vdd_error(errp, "gnutls_init: %s", gnutls_strerror(r));
	r = gnutls_priority_set_direct(s, prio, NULL);
	if (r >= 0)
		r = c->psk ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, c->psk_creds)
			   : gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, c->x509);
	if (r < 0) {
		gnutls_deinit(s);
		return vdd_error(errp, "TLS session setup: %s", gnutls_strerror(r));
	}
	if (!c->psk && c->verify_peer)
		gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
	gnutls_transport_set_int(s, fd);
	*out = s;
	return 0;
}

int vdd_tls_handshake(struct vdd_tls_creds *c, gnutls_session_t s, struct vdd_cofd *cofd, const bool *broken,
		      char **errp)
{
	unsigned status = 0;
	int r;

	for (;;) {
		if (*broken)
			return vdd_error(errp, "connection closed");
		r = gnutls_handshake(s);
		if (r == 0)
			break;
		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
			vdd_cofd_wait(cofd, gnutls_record_get_direction(s) ? POLLOUT : POLLIN);
			continue;
		}
		if (gnutls_error_is_fatal(r))
			return vdd_error(errp, "%s", gnutls_strerror(r));
	}
	if (!c->psk && c->verify_peer) {
		r = gnutls_certificate_verify_peers2(s, &status);
		if (r < 0)
			return vdd_error(errp, "cannot verify the client certificate: %s", gnutls_strerror(r));
		if (status)
			return vdd_error(errp, "the client certificate is not trusted (status 0x%x)", status);
	}
	return 0;
}
