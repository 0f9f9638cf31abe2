/*
 * Feeds nasp's C ABI (include/nasp.h) bad arguments and checks that each
 * call returns its documented status with a message, never a crash:
 * NULL and made-up handles of every kind, NULL out-pointers, NULL strings
 * and arrays with lengths, invalid UTF-8, a handle of the wrong kind,
 * double frees of a response, a buffer, a connection, a listener, a
 * streaming request and a mesh, a declared body length broken both ways,
 * and calls on a shut-down and on a freed mesh.
 *
 *   bad_args CONFIG_FILE URL TCP_TARGET
 *
 * CONFIG_FILE joins a mesh in which URL answers HTTP and TCP_TARGET
 * (host:port) accepts TCP (the test's fixture).
 * A check of a successful call also wants an empty message: a success
 * clears the last error.
 *
 * Prints one line per failed check and "checks N" at the end; exits 0 when
 * every check passed, 1 otherwise.
 *
 * Build as http.c (README.md); the test is
 * crates/nasp-ffi/tests/c_example.rs, which also runs this under valgrind.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nasp.h"

static int checks = 0;
static int failures = 0;

/* The call returned `want`, nasp_last_error_status() agrees, and the
 * message contains `says` (an empty `says` wants an empty message). */
static void expect(NaspStatus got, NaspStatus want, const char *says, int line) {
    char msg[512];
    size_t len = nasp_last_error(msg, sizeof msg);
    NaspStatus last = nasp_last_error_status();
    checks++;
    int ok = got == want && last == want && len < sizeof msg &&
             (says[0] == '\0' ? len == 0 : strstr(msg, says) != NULL);
    if (!ok) {
        failures++;
        fprintf(stderr, "line %d: status %d (last %d), want %d; message \"%s\", want \"%s\"\n",
                line, (int)got, (int)last, (int)want, msg, says);
    }
}
#define EXPECT(call, want, says) expect((call), (want), (says), __LINE__)

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

/* Without a mesh: every kind of handle at 0 and made up, NULL pointers,
 * a config that is not UTF-8. */
static void without_a_mesh(void) {
    NaspMesh mesh = {0};
    const char *cfg = "trust_domain: x\n";
    EXPECT(nasp_mesh_new(NULL, 5, &mesh), NASP_STATUS_INVALID_ARGUMENT, "config is NULL");
    EXPECT(nasp_mesh_new(cfg, strlen(cfg), NULL), NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    const char bad_utf8[] = "runtime: \xff\xfe\n";
    EXPECT(nasp_mesh_new(bad_utf8, strlen(bad_utf8), &mesh), NASP_STATUS_INVALID_ARGUMENT,
           "not UTF-8");
    EXPECT(nasp_mesh_new(cfg, strlen(cfg), &mesh), NASP_STATUS_CONFIG, "control_plane");
    if (mesh.id != 0) {
        fprintf(stderr, "a failed nasp_mesh_new wrote its out-pointer\n");
        failures++;
    }

    NaspMesh zero = {0};
    NaspMesh made_up = {((uint64_t)1 << 56) | 12345};
    NaspStr view;
    bool ready;
    NaspBuf buf = {0};
    EXPECT(nasp_mesh_id(zero, &view), NASP_STATUS_INVALID_HANDLE, "is 0");
    EXPECT(nasp_mesh_id(made_up, &view), NASP_STATUS_INVALID_HANDLE, "unknown");
    EXPECT(nasp_mesh_is_ready(zero, &ready), NASP_STATUS_INVALID_HANDLE, "mesh");
    EXPECT(nasp_mesh_metrics(made_up, &buf), NASP_STATUS_INVALID_HANDLE, "mesh");
    EXPECT(nasp_mesh_shutdown(zero, 0), NASP_STATUS_INVALID_HANDLE, "mesh");
    EXPECT(nasp_mesh_free(zero), NASP_STATUS_INVALID_HANDLE, "mesh");
    EXPECT(nasp_mesh_free(made_up), NASP_STATUS_INVALID_HANDLE, "unknown");

    NaspResponse resp = {0};
    EXPECT(nasp_http_request(zero, "GET", "http://a/", NULL, 0, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_HANDLE, "mesh");
    uint16_t status;
    size_t n;
    uint8_t chunk[8];
    EXPECT(nasp_response_status(resp, &status), NASP_STATUS_INVALID_HANDLE, "response");
    EXPECT(nasp_response_header_count(resp, &n), NASP_STATUS_INVALID_HANDLE, "response");
    EXPECT(nasp_response_peer_id(resp, &view), NASP_STATUS_INVALID_HANDLE, "response");
    EXPECT(nasp_response_read(resp, chunk, sizeof chunk, &n, 0), NASP_STATUS_INVALID_HANDLE,
           "response");
    EXPECT(nasp_response_read_all(resp, 10, 0, &buf), NASP_STATUS_INVALID_HANDLE, "response");
    EXPECT(nasp_response_free(resp), NASP_STATUS_INVALID_HANDLE, "response");

    NaspConn conn = {0};
    NaspListener listener = {0};
    NaspRequest req = {0};
    EXPECT(nasp_tcp_connect(zero, "echo.demo:19000", 0, &conn), NASP_STATUS_INVALID_HANDLE,
           "mesh");
    EXPECT(nasp_conn_read(conn, chunk, sizeof chunk, &n, 0), NASP_STATUS_INVALID_HANDLE,
           "connection");
    EXPECT(nasp_conn_write(conn, chunk, sizeof chunk, 0), NASP_STATUS_INVALID_HANDLE,
           "connection");
    EXPECT(nasp_conn_shutdown_write(conn, 0), NASP_STATUS_INVALID_HANDLE, "connection");
    EXPECT(nasp_conn_peer_id(conn, &view), NASP_STATUS_INVALID_HANDLE, "connection");
    EXPECT(nasp_conn_peer_addr(conn, &view), NASP_STATUS_INVALID_HANDLE, "connection");
    EXPECT(nasp_conn_close(conn), NASP_STATUS_INVALID_HANDLE, "connection");
    EXPECT(nasp_listen(made_up, "127.0.0.1:0", &listener), NASP_STATUS_INVALID_HANDLE, "mesh");
    EXPECT(nasp_listener_local_addr(listener, &view), NASP_STATUS_INVALID_HANDLE, "listener");
    EXPECT(nasp_listener_accept(listener, 0, &conn), NASP_STATUS_INVALID_HANDLE, "listener");
    EXPECT(nasp_listener_close(listener), NASP_STATUS_INVALID_HANDLE, "listener");
    EXPECT(nasp_http_start(zero, "POST", "http://a/", NULL, 0, -1, 0, &req),
           NASP_STATUS_INVALID_HANDLE, "mesh");
    EXPECT(nasp_request_write(req, chunk, sizeof chunk, 0), NASP_STATUS_INVALID_HANDLE,
           "request");
    EXPECT(nasp_request_finish(req, 0, &resp), NASP_STATUS_INVALID_HANDLE, "request");
    EXPECT(nasp_request_free(req), NASP_STATUS_INVALID_HANDLE, "request");

    const uint8_t *ptr;
    EXPECT(nasp_buf_data(buf, &ptr, &n), NASP_STATUS_INVALID_HANDLE, "buffer");
    EXPECT(nasp_buf_free(buf), NASP_STATUS_INVALID_HANDLE, "buffer");
    EXPECT(nasp_buf_data(buf, NULL, &n), NASP_STATUS_INVALID_ARGUMENT, "ptr is NULL");
}

/* With a joined mesh: request arguments, a wrong-kind handle, double
 * frees, then calls after shutdown and after free. Returns 0 when the
 * mesh could not be joined. */
static int with_a_mesh(const char *config, size_t config_len, const char *url,
                       const char *tcp) {
    NaspMesh mesh = {0};
    NaspStatus s = nasp_mesh_new(config, config_len, &mesh);
    EXPECT(s, NASP_STATUS_OK, "");
    if (s != NASP_STATUS_OK) {
        return 0;
    }

    NaspResponse resp = {0};
    NaspHeader bad_name[] = {{"a b", 3, "v", 1}};
    NaspHeader null_value[] = {{"x", 1, NULL, 4}};
    EXPECT(nasp_http_request(mesh, NULL, url, NULL, 0, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "method is NULL");
    EXPECT(nasp_http_request(mesh, "GET", NULL, NULL, 0, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "url is NULL");
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 0, NULL, 0, 0, NULL),
           NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 2, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "headers is NULL");
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 0, NULL, 3, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "body is NULL");
    EXPECT(nasp_http_request(mesh, "GET", "http://echo.demo:18080/\xff", NULL, 0, NULL, 0, 0,
                             &resp),
           NASP_STATUS_INVALID_ARGUMENT, "url is not UTF-8");
    EXPECT(nasp_http_request(mesh, "GET", "not a url", NULL, 0, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "url");
    EXPECT(nasp_http_request(mesh, "G T", url, NULL, 0, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "method");
    EXPECT(nasp_http_request(mesh, "GET", url, bad_name, 1, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "headers[0].name");
    EXPECT(nasp_http_request(mesh, "GET", url, null_value, 1, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_ARGUMENT, "headers[0].value");
    if (resp.id != 0) {
        fprintf(stderr, "a failed nasp_http_request wrote its out-pointer\n");
        failures++;
    }

    /* A response: accessor arguments, the wrong kind, a double free. */
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 0, NULL, 0, 0, &resp), NASP_STATUS_OK, "");
    NaspStr a, b;
    size_t n;
    uint16_t status;
    EXPECT(nasp_response_header_at(resp, 999, &a, &b), NASP_STATUS_INVALID_ARGUMENT,
           "out of range");
    EXPECT(nasp_response_header_at(resp, 0, NULL, &b), NASP_STATUS_INVALID_ARGUMENT,
           "name is NULL");
    EXPECT(nasp_response_read(resp, NULL, 8, &n, 0), NASP_STATUS_INVALID_ARGUMENT, "buf");
    EXPECT(nasp_response_status(resp, NULL), NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    NaspMesh as_mesh = {resp.id};
    EXPECT(nasp_mesh_id(as_mesh, &a), NASP_STATUS_INVALID_HANDLE, "is a response, not a mesh");
    EXPECT(nasp_mesh_free(as_mesh), NASP_STATUS_INVALID_HANDLE, "not a mesh");
    EXPECT(nasp_response_free(resp), NASP_STATUS_OK, "");
    EXPECT(nasp_response_free(resp), NASP_STATUS_INVALID_HANDLE, "already freed");
    EXPECT(nasp_response_status(resp, &status), NASP_STATUS_INVALID_HANDLE, "already freed");

    /* A buffer: a double free. */
    NaspBuf buf = {0};
    EXPECT(nasp_mesh_metrics(mesh, &buf), NASP_STATUS_OK, "");
    EXPECT(nasp_buf_free(buf), NASP_STATUS_OK, "");
    EXPECT(nasp_buf_free(buf), NASP_STATUS_INVALID_HANDLE, "already freed");

    /* A body larger than read_all's max. */
    uint8_t body[64];
    memset(body, 7, sizeof body);
    NaspResponse big = {0};
    EXPECT(nasp_http_request(mesh, "POST", url, NULL, 0, body, sizeof body, 0, &big),
           NASP_STATUS_OK, "");
    EXPECT(nasp_response_read_all(big, 10, 0, &buf), NASP_STATUS_IO, "larger than max");
    EXPECT(nasp_response_free(big), NASP_STATUS_OK, "");

    /* TCP: NULL and malformed targets and addresses, NULL buffers, a
     * connection handle of the wrong kind, a double close; a listener's
     * double close. */
    NaspConn conn = {0};
    uint8_t small[8];
    EXPECT(nasp_tcp_connect(mesh, NULL, 0, &conn), NASP_STATUS_INVALID_ARGUMENT,
           "target is NULL");
    EXPECT(nasp_tcp_connect(mesh, "no-port", 0, &conn), NASP_STATUS_INVALID_ARGUMENT,
           "not host:port");
    EXPECT(nasp_tcp_connect(mesh, tcp, 0, NULL), NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    EXPECT(nasp_tcp_connect(mesh, tcp, 0, &conn), NASP_STATUS_OK, "");
    EXPECT(nasp_conn_read(conn, NULL, 8, &n, 0), NASP_STATUS_INVALID_ARGUMENT, "buf");
    EXPECT(nasp_conn_read(conn, small, 0, &n, 0), NASP_STATUS_INVALID_ARGUMENT, "cap is 0");
    EXPECT(nasp_conn_write(conn, NULL, 4, 0), NASP_STATUS_INVALID_ARGUMENT, "buf is NULL");
    EXPECT(nasp_conn_peer_id(conn, NULL), NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    EXPECT(nasp_conn_read(conn, small, sizeof small, &n, 50), NASP_STATUS_TIMEOUT, "no answer");
    NaspListener as_listener = {conn.id};
    EXPECT(nasp_listener_close(as_listener), NASP_STATUS_INVALID_HANDLE,
           "is a connection, not a listener");
    EXPECT(nasp_conn_close(conn), NASP_STATUS_OK, "");
    EXPECT(nasp_conn_close(conn), NASP_STATUS_INVALID_HANDLE, "already freed");
    NaspListener listener = {0};
    EXPECT(nasp_listen(mesh, NULL, &listener), NASP_STATUS_INVALID_ARGUMENT, "addr is NULL");
    EXPECT(nasp_listen(mesh, "localhost", &listener), NASP_STATUS_INVALID_ARGUMENT,
           "not ip:port");
    EXPECT(nasp_listen(mesh, "127.0.0.1:0", &listener), NASP_STATUS_OK, "");
    EXPECT(nasp_listener_accept(listener, 50, &conn), NASP_STATUS_TIMEOUT, "no answer");
    EXPECT(nasp_listener_accept(listener, 0, NULL), NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    EXPECT(nasp_listener_close(listener), NASP_STATUS_OK, "");
    EXPECT(nasp_listener_close(listener), NASP_STATUS_INVALID_HANDLE, "already freed");

    /* A streaming request: past its declared length, finished short (which
     * consumes it), an abort, and finish's NULL out. */
    NaspRequest req = {0};
    EXPECT(nasp_http_start(mesh, "POST", url, NULL, 0, 4, 0, NULL), NASP_STATUS_INVALID_ARGUMENT,
           "out is NULL");
    EXPECT(nasp_http_start(mesh, "POST", url, NULL, 0, 4, 0, &req), NASP_STATUS_OK, "");
    EXPECT(nasp_request_write(req, body, 5, 0), NASP_STATUS_INVALID_ARGUMENT, "content_length");
    EXPECT(nasp_request_write(req, body, 2, 0), NASP_STATUS_OK, "");
    EXPECT(nasp_request_finish(req, 0, NULL), NASP_STATUS_INVALID_ARGUMENT, "out is NULL");
    EXPECT(nasp_request_finish(req, 0, &resp), NASP_STATUS_INVALID_ARGUMENT, "2 of the 4");
    EXPECT(nasp_request_free(req), NASP_STATUS_INVALID_HANDLE, "already freed");
    EXPECT(nasp_http_start(mesh, "POST", url, NULL, 0, -1, 0, &req), NASP_STATUS_OK, "");
    EXPECT(nasp_request_write(req, body, sizeof body, 0), NASP_STATUS_OK, "");
    EXPECT(nasp_request_free(req), NASP_STATUS_OK, "");
    EXPECT(nasp_request_free(req), NASP_STATUS_INVALID_HANDLE, "already freed");

    /* After shutdown: CLOSED, a second shutdown is OK, the id still reads.
     * After free: every handle of the mesh is unknown, and a response
     * that was never freed went with its mesh. */
    NaspResponse kept = {0};
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 0, NULL, 0, 0, &kept), NASP_STATUS_OK, "");
    EXPECT(nasp_mesh_shutdown(mesh, 0), NASP_STATUS_OK, "");
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 0, NULL, 0, 0, &resp), NASP_STATUS_CLOSED,
           "shut down");
    uint8_t chunk[8];
    EXPECT(nasp_response_read(kept, chunk, sizeof chunk, &n, 0), NASP_STATUS_CLOSED,
           "shut down");
    bool ready;
    EXPECT(nasp_mesh_is_ready(mesh, &ready), NASP_STATUS_CLOSED, "shut down");
    EXPECT(nasp_tcp_connect(mesh, tcp, 0, &conn), NASP_STATUS_CLOSED, "shut down");
    EXPECT(nasp_listen(mesh, "127.0.0.1:0", &listener), NASP_STATUS_CLOSED, "shut down");
    EXPECT(nasp_http_start(mesh, "POST", url, NULL, 0, -1, 0, &req), NASP_STATUS_CLOSED,
           "shut down");
    EXPECT(nasp_mesh_shutdown(mesh, 0), NASP_STATUS_OK, "");
    EXPECT(nasp_mesh_id(mesh, &a), NASP_STATUS_OK, "");
    EXPECT(nasp_mesh_free(mesh), NASP_STATUS_OK, "");
    EXPECT(nasp_mesh_free(mesh), NASP_STATUS_INVALID_HANDLE, "already freed");
    EXPECT(nasp_mesh_id(mesh, &a), NASP_STATUS_INVALID_HANDLE, "already freed");
    EXPECT(nasp_http_request(mesh, "GET", url, NULL, 0, NULL, 0, 0, &resp),
           NASP_STATUS_INVALID_HANDLE, "already freed");
    EXPECT(nasp_response_free(kept), NASP_STATUS_INVALID_HANDLE, "already freed");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CONFIG_FILE URL TCP_TARGET\n", argv[0]);
        return 2;
    }
    size_t config_len = 0;
    char *config = read_file(argv[1], &config_len);
    if (config == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 1;
    }
    without_a_mesh();
    int joined = with_a_mesh(config, config_len, argv[2], argv[3]);
    free(config);
    printf("checks %d\n", checks);
    printf("failures %d\n", failures);
    return joined && failures == 0 ? 0 : 1;
}
