/* respond.c - not yet implemented. */
#include <stdio.h>
int main(void);
int
main(void)
{
	fputs("respond.c: not yet implemented\n", stderr);
	return 70;
}
