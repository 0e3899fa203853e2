/*
 * errors.c: libvshm's error paths over vshmd's socket. Each check prints
 * "ok <what> <STATUS_NAME>" or "FAIL <what>: …"; exits with the number of failures.
 *
 *   ./errors /run/vshm/vshm.sock
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vshm.h>

static int failures;

static void expect(const char *what, vshm_status got, vshm_status want)
{
    const char *got_name = vshm_status_name(got);
    const char *want_name = vshm_status_name(want);
    if (got == want) {
        printf("ok %s %s\n", what, got_name);
    } else {
        printf("FAIL %s: got %s (0x%08X), want %s: %s\n", what, got_name ? got_name : "?",
               (unsigned)got, want_name ? want_name : "?", vshm_last_error());
        failures++;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s VSHMD_SOCKET\n", argv[0]);
        return 2;
    }
    char missing[4096];
    snprintf(missing, sizeof missing, "%s.missing", argv[1]);
    vshm_namespace *ns = (vshm_namespace *)1;
    expect("attach-missing-socket", vshm_attach_host(missing, &ns),
           VSHM_STATUS_OBJECT_NAME_NOT_FOUND);
    if (ns != NULL) {
        printf("FAIL attach-missing-socket left a handle\n");
        failures++;
    }
    if (strstr(vshm_last_error(), ".missing") == NULL) {
        printf("FAIL last-error does not name the socket: %s\n", vshm_last_error());
        failures++;
    }
    expect("attach-null-path", vshm_attach_host(NULL, &ns), VSHM_STATUS_INVALID_PARAMETER);
    expect("attach-null-out", vshm_attach_host(argv[1], NULL), VSHM_STATUS_INVALID_PARAMETER);
    expect("attach", vshm_attach_host(argv[1], &ns), VSHM_STATUS_SUCCESS);
    if (ns == NULL)
        return 1;

    vshm_section *section = NULL;
    expect("open-null-name",
           vshm_section_open(ns, NULL, VSHM_ACCESS_READ_WRITE, &section, NULL),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("open-bad-utf8",
           vshm_section_open(ns, "bad\xff", VSHM_ACCESS_READ_WRITE, &section, NULL),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("open-null-ns",
           vshm_section_open(NULL, "x", VSHM_ACCESS_READ_WRITE, &section, NULL),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("open-unknown-name",
           vshm_section_open(ns, "errors-no-such", VSHM_ACCESS_READ_WRITE, &section, NULL),
           VSHM_STATUS_OBJECT_NAME_NOT_FOUND);
    expect("open-backslash",
           vshm_section_open(ns, "errors\\x", VSHM_ACCESS_READ_WRITE, &section, NULL),
           VSHM_STATUS_OBJECT_NAME_INVALID);
    expect("open-bad-access", vshm_section_open(ns, "errors-x", 7, &section, NULL),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("delete-unknown-name", vshm_delete(ns, "errors-no-such"),
           VSHM_STATUS_OBJECT_NAME_NOT_FOUND);
    expect("delete-null-name", vshm_delete(ns, NULL), VSHM_STATUS_INVALID_PARAMETER);
    expect("create-max-size-0",
           vshm_section_create(ns, "errors-s", 0, 0, false, &section, NULL, NULL),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("create-initial-above-max",
           vshm_section_create(ns, "errors-s", 4096, 8192, false, &section, NULL, NULL),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("create-null-out",
           vshm_section_create(ns, "errors-s", 4096, 4096, false, NULL, NULL, NULL),
           VSHM_STATUS_INVALID_PARAMETER);

    /* A name of another kind: RtkCreateSharedMemory's STATUS_INVALID_HANDLE. */
    vshm_event *event = NULL;
    expect("event-create", vshm_event_create(ns, "errors-event", false, false, &event, NULL),
           VSHM_STATUS_SUCCESS);
    expect("open-section-named-like-an-event",
           vshm_section_open(ns, "errors-event", VSHM_ACCESS_READ_WRITE, &section, NULL),
           VSHM_STATUS_INVALID_HANDLE);
    expect("create-section-named-like-an-event",
           vshm_section_create(ns, "errors-event", 4096, 4096, false, &section, NULL, NULL),
           VSHM_STATUS_INVALID_HANDLE);
    vshm_mutex *mutex = NULL;
    expect("open-mutex-named-like-an-event", vshm_mutex_open(ns, "errors-event", &mutex),
           VSHM_STATUS_INVALID_HANDLE);
    expect("event-wait-times-out", vshm_event_wait(event, 1000000), VSHM_STATUS_TIMEOUT);

    expect("mutex-create", vshm_mutex_create(ns, "errors-mutex", false, &mutex, NULL),
           VSHM_STATUS_SUCCESS);
    expect("unlock-not-owned", vshm_mutex_unlock(mutex), VSHM_STATUS_MUTANT_NOT_OWNED);
    vshm_event *wrong = NULL;
    expect("open-event-named-like-a-mutex", vshm_event_open(ns, "errors-mutex", &wrong),
           VSHM_STATUS_INVALID_HANDLE);

    /* Bounds and access. */
    expect("create", vshm_section_create(ns, "errors-s", 8192, 4096, false, &section, NULL, NULL),
           VSHM_STATUS_SUCCESS);
    char byte = 'x';
    expect("write-past-size", vshm_section_write(section, 4096, &byte, 1),
           VSHM_STATUS_INVALID_PARAMETER);
    expect("grow-past-max", vshm_section_grow(section, 16384), VSHM_STATUS_INVALID_PARAMETER);
    vshm_section *reader = NULL;
    expect("open-read-only",
           vshm_section_open(ns, "errors-s", VSHM_ACCESS_READ_ONLY, &reader, NULL),
           VSHM_STATUS_SUCCESS);
    expect("write-read-only", vshm_section_write(reader, 0, &byte, 1),
           VSHM_STATUS_ACCESS_DENIED);
    expect("read-read-only", vshm_section_read(reader, 0, &byte, 1), VSHM_STATUS_SUCCESS);
    expect("wait-change-times-out", vshm_section_wait_change(reader, 1000000, NULL),
           VSHM_STATUS_TIMEOUT);

    expect("close-null", vshm_section_close(NULL), VSHM_STATUS_INVALID_PARAMETER);
    expect("detach-null", vshm_detach(NULL), VSHM_STATUS_INVALID_PARAMETER);
    expect("close-reader", vshm_section_close(reader), VSHM_STATUS_SUCCESS);
    expect("close-section", vshm_section_close(section), VSHM_STATUS_SUCCESS);
    expect("close-mutex", vshm_mutex_close(mutex), VSHM_STATUS_SUCCESS);
    expect("close-event", vshm_event_close(event), VSHM_STATUS_SUCCESS);
    expect("detach", vshm_detach(ns), VSHM_STATUS_SUCCESS);
    printf("%d failures\n", failures);
    return failures;
}
