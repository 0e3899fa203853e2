/*
 * guest.c: a program inside a Linux guest using libvshm over the guest's ivshmem device
 * (the vshm kernel driver's /dev/vshmN when it is loaded, sysfs otherwise).
 *
 * Creates (or opens) section NAME, writes TEXT into it under the mutex NAME.lock, signals
 * the event NAME.ready and waits up to 60 s for another peer (any VM or host process) to
 * signal NAME.ack, then reads the section back: the peer may have written its answer
 * there. Prints one line per step; exits 0 on success, 1 on the first failure, 2 on bad
 * arguments.
 *
 *   cc -static -o vshm-c-example guest.c -I guest/capi/include libvshm_capi.a -lpthread -ldl -lm
 *   vshm-c-example NAME TEXT       (in the guest, as root or a member of /dev/vshmN's group)
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vshm.h>

static int failed(const char *what, vshm_status st)
{
    const char *name = vshm_status_name(st);
    fprintf(stderr, "%s failed: %s (0x%08X): %s\n", what, name ? name : "?", (unsigned)st,
            vshm_last_error());
    return 1;
}

#define CHECK(what, call)                                                                  \
    do {                                                                                   \
        vshm_status st_ = (call);                                                          \
        if (st_ != VSHM_STATUS_SUCCESS)                                                    \
            return failed(what, st_);                                                      \
    } while (0)

int main(int argc, char **argv)
{
    if (argc != 3 || strlen(argv[1]) > 200 || strlen(argv[2]) >= 4096) {
        fprintf(stderr, "usage: %s NAME TEXT (NAME up to 200 bytes, TEXT under 4096)\n",
                argv[0]);
        return 2;
    }
    const char *name = argv[1], *text = argv[2];
    char lock_name[256], ready_name[256], ack_name[256];
    snprintf(lock_name, sizeof lock_name, "%s.lock", name);
    snprintf(ready_name, sizeof ready_name, "%s.ready", name);
    snprintf(ack_name, sizeof ack_name, "%s.ack", name);

    vshm_namespace *ns = NULL;
    CHECK("vshm_attach_pci", vshm_attach_pci(NULL, &ns));
    uint16_t peer = 0;
    CHECK("vshm_peer_id", vshm_peer_id(ns, &peer));
    printf("attached as peer %u\n", (unsigned)peer);

    vshm_section *section = NULL;
    uint32_t disposition = 0;
    CHECK("vshm_section_create",
          vshm_section_create(ns, name, 64 << 10, 4096, false, &section, NULL, &disposition));
    printf("%s %s\n", disposition == VSHM_DISPOSITION_CREATED ? "created" : "opened", name);

    /* Events first: a peer that sees NAME.ready must find NAME.ack to signal. */
    vshm_event *ready = NULL, *ack = NULL;
    CHECK("vshm_event_create ready",
          vshm_event_create(ns, ready_name, false, false, &ready, NULL));
    CHECK("vshm_event_create ack", vshm_event_create(ns, ack_name, false, false, &ack, NULL));

    vshm_mutex *lock = NULL;
    CHECK("vshm_mutex_create", vshm_mutex_create(ns, lock_name, false, &lock, NULL));
    vshm_status st = vshm_mutex_lock(lock, 10ull * 1000000000ull);
    if (st != VSHM_STATUS_SUCCESS && st != VSHM_STATUS_ABANDONED)
        return failed("vshm_mutex_lock", st);
    CHECK("vshm_section_write", vshm_section_write(section, 0, text, strlen(text) + 1));
    CHECK("vshm_mutex_unlock", vshm_mutex_unlock(lock));
    printf("wrote %zu bytes\n", strlen(text));

    CHECK("vshm_event_signal", vshm_event_signal(ready));
    printf("signalled %s; waiting for %s\n", ready_name, ack_name);
    fflush(stdout);
    CHECK("vshm_event_wait", vshm_event_wait(ack, 60ull * 1000000000ull));

    char back[4096] = {0};
    CHECK("vshm_section_read", vshm_section_read(section, 0, back, sizeof back - 1));
    printf("acknowledged; the section now says: %s\n", back);

    CHECK("vshm_mutex_close", vshm_mutex_close(lock));
    CHECK("vshm_event_close ack", vshm_event_close(ack));
    CHECK("vshm_event_close ready", vshm_event_close(ready));
    CHECK("vshm_section_close", vshm_section_close(section));
    CHECK("vshm_detach", vshm_detach(ns));
    printf("done\n");
    return 0;
}
