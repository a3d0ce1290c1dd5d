// test_header.cpp: the generated header compiles as C++11 with
// -Wall -Wextra -Wpedantic -Werror, declares C linkage, and its types are
// usable from C++. Built, linked and run by test_c_examples.py.
#include "tcpframe.h"

#include <cstddef>
#include <type_traits>

static_assert(TF_OK == 0 && TF_ERR_INVALID == 1 && TF_ERR_NO_CONN == 2 && TF_ERR_FULL == 3 &&
                  TF_ERR_TOO_LARGE == 4 && TF_ERR_STOPPED == 5 && TF_ERR_IO == 6 &&
                  TF_ERR_INTERNAL == 7,
              "error codes are fixed by the contract");
static_assert(sizeof(tf_conn_id) == 8, "tf_conn_id is 64-bit");
static_assert(std::is_standard_layout<tf_stats>::value, "tf_stats is a plain C struct");
static_assert(std::is_standard_layout<tf_event>::value, "tf_event is a plain C struct");

extern "C" {
static void on_message(void *, tf_conn_id, const uint8_t *, size_t) {}
}

int header_uses_everything_cpp();
int header_uses_everything_cpp() {
    tf_callbacks cb = {nullptr, nullptr, on_message, nullptr};
    tf_server *srv = nullptr;
    tf_config *cfg = tf_config_new();
    int32_t rc = tf_server_start(cfg, &cb, &srv);
    tf_server_free(srv);
    tf_config_free(cfg);
    // Taking the address of every function checks each one's declared type.
    int32_t (*send)(tf_server *, tf_conn_id, const uint8_t *, size_t) = tf_send;
    int32_t (*poll)(tf_server *, tf_event *, size_t, size_t *, int32_t) = tf_server_poll;
    int32_t (*stop)(tf_server *, uint32_t) = tf_server_stop;
    const char *(*err)() = tf_last_error;
    return rc + (send != nullptr) + (poll != nullptr) + (stop != nullptr) + (err != nullptr);
}

// Linked and run too: without extern "C" in the header the names would be
// mangled and this would not link against libtcpframe.
int main() {
    int (*keep)() = header_uses_everything_cpp; // linked, not called
    const char *v = tf_version();
    return keep != nullptr && v != nullptr && v[0] != '\0' ? 0 : 1;
}
