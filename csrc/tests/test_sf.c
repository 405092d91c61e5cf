#include "sf.h"
#include <stdio.h>
int main(void){ sf_config c; sf_config_default(&c, 50, 64, 4, 2, 16); sf_model *m; char err[256];
 if (sf_model_create(&c, 0, &m, err, sizeof err)) { printf("%s\n", err); return 1; }
 int32_t tok[16]; for (int i=0;i<16;i++) tok[i]=i; float logits[16*50];
 sf_forward_args a = {tok, NULL, NULL, 1, 16, 1, 0};
 if (sf_forward(m, &a, logits, NULL, NULL, err, sizeof err)) { printf("%s\n", err); return 1; }
 printf("%f %f\n", logits[0], logits[16*50-1]); sf_model_free(m); return 0; }
