/*
 * TCP through the mesh with nasp's C ABI (include/nasp.h): a connection
 * to a mesh service over mTLS, echoed and half-closed, then a mesh
 * listener that the same program reaches by service name and accepts.
 *
 *   tcp CONFIG_FILE ECHO_TARGET LISTEN_ADDR SELF_TARGET
 *
 * ECHO_TARGET (host:port) echoes what it reads and ends its side when
 * ours ends; LISTEN_ADDR (ip:port) is where this workload listens, and
 * SELF_TARGET the mesh name that reaches it. Prints the server's verified
 * id and the echo, the caller's verified id as the listener saw it and
 * the bytes exchanged, the TCP connection series of the metrics text,
 * then frees everything and exits 0; on a failure it prints the call, its
 * status and nasp_last_error() and exits 1.
 *
 * Build as http.c (README.md); the test is
 * crates/nasp-ffi/tests/c_example.rs, which also runs this under valgrind.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nasp.h"

static int check(NaspStatus s, const char *what) {
    if (s == NASP_STATUS_OK) {
        return 1;
    }
    char msg[512];
    nasp_last_error(msg, sizeof msg);
    fprintf(stderr, "%s: status %d: %s\n", what, (int)s, msg);
    return 0;
}

/* The whole file, NUL-terminated, in *len bytes; free() it. */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    char *text = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        if (size >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            text = malloc((size_t)size + 1);
            if (text != NULL && fread(text, 1, (size_t)size, f) == (size_t)size) {
                text[size] = '\0';
                *len = (size_t)size;
            } else {
                free(text);
                text = NULL;
            }
        }
    }
    fclose(f);
    return text;
}

/* Reads exactly `len` bytes into `buf`; 0 on an error or an early end. */
static int read_exact(NaspConn c, uint8_t *buf, size_t len) {
    size_t at = 0;
    while (at < len) {
        size_t n = 0;
        if (!check(nasp_conn_read(c, buf + at, len - at, &n, 0), "nasp_conn_read")) {
            return 0;
        }
        if (n == 0) {
            fprintf(stderr, "the stream ended after %zu of %zu bytes\n", at, len);
            return 0;
        }
        at += n;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s CONFIG_FILE ECHO_TARGET LISTEN_ADDR SELF_TARGET\n", argv[0]);
        return 2;
    }
    size_t config_len = 0;
    char *config = read_file(argv[1], &config_len);
    if (config == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 1;
    }

    int ok = 0;
    NaspMesh mesh = {0};
    NaspConn echo = {0}, out = {0}, in = {0};
    NaspListener listener = {0};
    NaspBuf metrics = {0};
    if (!check(nasp_mesh_new(config, config_len, &mesh), "nasp_mesh_new")) {
        goto done;
    }

    /* 1. The echo service, by name: mTLS with Istio's TCP ALPN. */
    if (!check(nasp_tcp_connect(mesh, argv[2], 0, &echo), "nasp_tcp_connect")) {
        goto done;
    }
    NaspStr peer;
    if (!check(nasp_conn_peer_id(echo, &peer), "nasp_conn_peer_id")) {
        goto done;
    }
    printf("echo peer %.*s\n", (int)peer.len, peer.ptr);
    const char *hello = "hello over mesh TCP";
    if (!check(nasp_conn_write(echo, (const uint8_t *)hello, strlen(hello), 0),
               "nasp_conn_write") ||
        !check(nasp_conn_shutdown_write(echo, 0), "nasp_conn_shutdown_write")) {
        goto done;
    }
    /* Our end is shut: the echo answers, then ends its side (n == 0). */
    printf("echo ");
    uint8_t buf[256];
    for (;;) {
        size_t n = 0;
        if (!check(nasp_conn_read(echo, buf, sizeof buf, &n, 0), "nasp_conn_read")) {
            goto done;
        }
        if (n == 0) {
            break;
        }
        fwrite(buf, 1, n, stdout);
    }
    printf("\n");

    /* 2. A mesh listener, reached through the mesh by its service name. */
    if (!check(nasp_listen(mesh, argv[3], &listener), "nasp_listen")) {
        goto done;
    }
    NaspStr local;
    if (!check(nasp_listener_local_addr(listener, &local), "nasp_listener_local_addr")) {
        goto done;
    }
    printf("listening %.*s\n", (int)local.len, local.ptr);
    if (!check(nasp_tcp_connect(mesh, argv[4], 0, &out), "nasp_tcp_connect (self)") ||
        !check(nasp_conn_write(out, (const uint8_t *)"ping", 4, 0), "nasp_conn_write (ping)") ||
        !check(nasp_listener_accept(listener, 0, &in), "nasp_listener_accept")) {
        goto done;
    }
    NaspStr caller;
    if (!check(nasp_conn_peer_id(in, &caller), "nasp_conn_peer_id (accepted)")) {
        goto done;
    }
    printf("accepted peer %.*s\n", (int)caller.len, caller.ptr);
    if (!read_exact(in, buf, 4)) {
        goto done;
    }
    printf("accepted read %.4s\n", (const char *)buf);
    if (!check(nasp_conn_write(in, (const uint8_t *)"pong", 4, 0), "nasp_conn_write (pong)") ||
        !read_exact(out, buf, 4)) {
        goto done;
    }
    printf("caller read %.4s\n", (const char *)buf);

    /* 3. The TCP series Istio's filters recorded. */
    if (!check(nasp_mesh_metrics(mesh, &metrics), "nasp_mesh_metrics")) {
        goto done;
    }
    const uint8_t *text;
    size_t text_len;
    if (!check(nasp_buf_data(metrics, &text, &text_len), "nasp_buf_data")) {
        goto done;
    }
    const char *prefix = "istio_tcp_connections_opened_total{";
    for (const char *line = (const char *)text; line != NULL && *line != '\0';) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        if (strncmp(line, prefix, strlen(prefix)) == 0) {
            printf("metric %.*s\n", (int)len, line);
        }
        line = end ? end + 1 : NULL;
    }
    ok = 1;

done:
    /* Only what was created is freed (the mesh would take the rest). */
    if (metrics.id != 0) {
        check(nasp_buf_free(metrics), "nasp_buf_free");
    }
    if (in.id != 0) {
        check(nasp_conn_close(in), "nasp_conn_close");
    }
    if (out.id != 0) {
        check(nasp_conn_close(out), "nasp_conn_close");
    }
    if (echo.id != 0) {
        check(nasp_conn_close(echo), "nasp_conn_close");
    }
    if (listener.id != 0) {
        check(nasp_listener_close(listener), "nasp_listener_close");
    }
    if (mesh.id != 0) {
        check(nasp_mesh_free(mesh), "nasp_mesh_free");
    }
    free(config);
    return ok ? 0 : 1;
}
