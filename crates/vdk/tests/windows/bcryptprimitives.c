/* Test setup only: Wine 8 has no bcryptprimitives.dll!ProcessPrng, which Rust's standard
 * library imports on Windows. This stand-in, placed beside vdk.exe and chosen with
 * WINEDLLOVERRIDES=bcryptprimitives=n,b, answers it from RtlGenRandom (advapi32). */
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) { return SystemFunction036(data, (ULONG)len); }
