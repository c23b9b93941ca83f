/*
 * noop - the floor of per-connection spawning: a static program that
 * does nothing; the connection on fd 0/1 closes when it exits.
 */
int main(void);

int
main(void)
{
	return 0;
}
